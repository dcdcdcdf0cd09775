"""megatron's DistributedDataParallel around a model: gradient reduction over data parallelism
(and finalisation wired into the schedules), and the way back to the model inside it."""

from __future__ import annotations


def wrap_for_training(
    model,
    use_distributed_optimizer: bool = True,
    overlap_grad_reduce: bool = False,
    grad_bucket_elements: int = 0,
):
    """megatron DDP around ``model``, with gradient finalisation wired into the schedules.

    With ``overlap_grad_reduce`` the schedules enter the DDP's ``no_sync`` for every micro-batch
    but the last (``config.no_sync_func``): a bucket's reduction starts once the last
    micro-batch's backward has produced all its gradients, and finalisation waits for them."""
    from megatron.core.distributed import DistributedDataParallel, DistributedDataParallelConfig
    from megatron.core.distributed.finalize_model_grads import finalize_model_grads

    config = model.config
    config.calculate_per_token_loss = True
    config.finalize_model_grads_func = finalize_model_grads
    ddp_config = DistributedDataParallelConfig(
        grad_reduce_in_fp32=True,
        overlap_grad_reduce=overlap_grad_reduce,
        bucket_size=grad_bucket_elements or None,
        use_distributed_optimizer=use_distributed_optimizer,
        check_for_nan_in_grad=False,
    )
    ddp = DistributedDataParallel(config=config, ddp_config=ddp_config, module=model)
    # megatron starts a bucket once each of its gradients has arrived as often as in the first
    # batch; no_sync keeps all but the last micro-batch out of that count, so minibatches of
    # other micro-batch counts (packing) still start on their last backward. Set either way:
    # the config belongs to the model, which a worker may wrap again.
    config.no_sync_func = ddp.no_sync if overlap_grad_reduce else None
    return ddp


def unwrap(model):
    """The megatron model inside ``wrap_for_training``'s DDP (or ``model`` itself, unwrapped)."""
    return model.module if hasattr(model, "module") else model
