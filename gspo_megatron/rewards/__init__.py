"""Rewards: built-in math-answer and format checks, user functions by import path, combined with
weights and run in a guarded worker process (a function that raises or hangs scores 0 and is
counted; the run goes on)."""
