"""User environments for tests/test_env_pool.py (imported by path, "agent_envs:Class", in the
pool's env processes)."""

import os
import sys
import threading
import time


class Scripted:
    """Three turns: each step answers with the turn number and rewards len(text); done on the
    third. Reset's message carries the process's pid (to see reuse)."""

    def __init__(self, row):
        self.row, self.turn, self.seen = row, 0, []

    def reset(self):
        return [
            {"role": "system", "content": "be brief"},
            {"role": "user", "content": f"{self.row['question']} pid={os.getpid()}"},
        ]

    def step(self, assistant_text):
        self.turn += 1
        self.seen.append(assistant_text)
        messages = [] if self.turn == 3 else [{"role": "user", "content": f"turn {self.turn}"}]
        return messages, self.turn == 3, float(len(assistant_text))

    def metadata(self):
        return {"seen": self.seen, "question": self.row["question"]}


class WithTools(Scripted):
    """Echoes the tool calls it receives as one tool message."""

    def step(self, assistant_text, tool_calls):
        return [{"role": "tool", "content": repr(tool_calls), "name": "echo"}], False, None


class Sleeps:
    """Every step sleeps 0.2 s (a slow tool) and says when it started and ended."""

    def __init__(self, row):
        pass

    def reset(self):
        return [{"role": "user", "content": str(os.getpid())}]

    def step(self, assistant_text):
        start = time.time()
        time.sleep(0.2)
        return [{"role": "user", "content": f"{start} {time.time()}"}], False, 0.0


class Custom(str):
    pass


class Misbehaves:
    """Each step does what assistant_text names (as buggy user code does); "ok" is fine."""

    def __init__(self, row):
        if row.get("construct") == "raise":
            raise ValueError("bad row")
        self.row = row

    def reset(self):
        how = self.row.get("reset", "ok")
        if how == "empty":
            return []
        if how == "not a list":
            return "hello"
        if how == "surrogate":
            return [{"role": "user", "content": "fine"}, {"role": "user", "content": "\udfff"}]
        return [{"role": "user", "content": f"go {os.getpid()}"}]

    def step(self, assistant_text):
        print(f"stepping {assistant_text}")
        how = assistant_text
        ok = [{"role": "user", "content": "fine"}]
        if how == "raise":
            raise RuntimeError("boom")
        if how == "KeyboardInterrupt":
            raise KeyboardInterrupt
        if how == "hang":
            time.sleep(60)
        if how == "sys.exit":
            sys.exit(3)
        if how == "os._exit":
            os._exit(7)
        if how == "hog":
            return [{"role": "user", "content": str(len(bytearray(3 << 30)))}], False, None
        if how == "hog in a child":  # a sandbox: the same cap, in a process of its own
            import subprocess

            code = "bytearray(3 << 30)"
            run = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
            last = (run.stderr.strip().splitlines() or ["ok"])[-1]
            return [{"role": "user", "content": f"{run.returncode} {last}"}], False, None
        returns = {
            "pair": (ok, False),
            "list": [ok, False, 1.0],
            "messages not a list": ("fine", False, 1.0),
            "message not a dict": (["fine"], False, 1.0),
            "no content": ([{"role": "user"}], False, 1.0),
            "bad role": ([{"role": "robot", "content": "x"}], False, 1.0),
            "content not str": ([ok[0], {"role": "user", "content": 3}], False, 1.0),
            "done not bool": (ok, 1, 1.0),
            "nan reward": (ok, False, float("nan")),
            "bool reward": (ok, False, True),
            "str reward": (ok, False, "1.0"),
            "empty not done": ([], False, 1.0),
            "not json": ([{"role": "user", "content": "x", "extra": object()}], False, None),
            "custom str": ([{"role": "user", "content": Custom("plain?")}], False, 0.5),
            "surrogate": ([{"role": "user", "content": "ab\ud800c"}], False, None),
            "tool_calls not a list": (
                [{"role": "assistant", "content": "x", "tool_calls": "notalist"}],
                False,
                None,
            ),
            "tool call without name": (
                [{"role": "assistant", "content": "", "tool_calls": [{"arguments": {}}]}],
                False,
                None,
            ),
            "tool_calls in a user turn": ([{**ok[0], "tool_calls": []}], False, None),
            "name not str": ([{"role": "tool", "content": "1", "name": 3}], False, None),
        }
        return returns.get(how, (ok, False, 1.0))

    def metadata(self):
        if self.row.get("metadata") == "raise":
            raise RuntimeError("no metadata")
        if self.row.get("metadata") == "hang":
            time.sleep(60)
        if self.row.get("metadata") == "exit later":  # a thread left behind ends the process
            threading.Timer(0.05, os._exit, (0,)).start()
        return {"fine": True}


class Prints:
    """Prints in reset (a line) and in step (far more than a reply carries)."""

    def __init__(self, row):
        pass

    def reset(self):
        print("hello from reset")
        os.write(2, b"and from C on fd 2\n")
        return [{"role": "user", "content": "go"}]

    def step(self, assistant_text):
        print("x" * 100_000)
        return [], True, None


class StartsChild:
    """Reset starts a long `sleep` (a sandbox); its pid is the message."""

    def __init__(self, row):
        pass

    def reset(self):
        import subprocess

        child = subprocess.Popen(["sleep", "600"])
        return [{"role": "user", "content": f"{os.getpid()} {child.pid}"}]

    def step(self, assistant_text):
        return [], True, None


class StartsEscaping:
    """Reset starts two `sleep`s out of reach of a process-group kill: one in a session of its
    own, one double-forked after setsid; the message is their pids."""

    def __init__(self, row):
        pass

    def reset(self):
        import subprocess
        import tempfile
        from pathlib import Path

        from reward_fns import _daemon

        child = subprocess.Popen(["sleep", "600"], start_new_session=True)
        with tempfile.TemporaryDirectory() as d:
            _daemon(Path(d) / "pid")
            daemon = int((Path(d) / "pid").read_text())
        return [{"role": "user", "content": f"{child.pid} {daemon}"}]

    def step(self, assistant_text):
        return [], True, None


def not_a_class(row):
    return None


class NoStep:
    def __init__(self, row):
        pass

    def reset(self):
        return []


NOT_CALLABLE = 3
