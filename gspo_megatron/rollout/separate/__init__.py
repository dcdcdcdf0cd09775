"""Rollouts on their own ranks: the rollout rank's loop (``rollout_rank``), the link between
rollout and training ranks (``link``), and which ranks do what (``placement``)."""
