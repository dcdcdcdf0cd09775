"""The learner's side of a step: from the step's samples to the updated policy.

``step_samples`` turns a step's rollouts into samples; ``update.policy_update`` scores pi_old
(``old_logprobs``) and the frozen reference (``reference``) through ``forward`` and
``logprobs`` (vocab-parallel log-probs on the last pipeline stage), packs or pads micro-batches
(``batch``, ``packing``), runs the minibatch steps with the objective of ``gspo_megatron.loss``
and the optimizer of ``optim``, and reports ``step_metrics``; ``routing_replay`` and
``route_change`` pin and measure the MoE routes."""
