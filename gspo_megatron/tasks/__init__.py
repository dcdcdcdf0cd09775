"""The built-in demo tasks, apart from the library: ``demo`` (copy a list of words, the
quickstart's) and ``agent_demo`` (a multi-turn tool task, the agent quickstart's). Each writes its
data, a tiny warm-started model and its checkpoint; their reward functions and environment are
what the launch configs name."""
