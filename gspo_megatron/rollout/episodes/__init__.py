"""Multi-turn agent episodes: the turn loop (``loop``), the environment processes (``env_pool``,
``tool_env``), tool-call parsing (``tool_calls``), token-exact transcripts (``transcript``) and
the ``agent`` config section (``agent_config``)."""
