"""The rollout engines: vLLM on this rank's engine group (``engine``), the live weight sync into
it (``weight_sync``, on CPU ``cpu_reload``), its KV-cache fit (``kv_cache``), the routes it took
(``routes``), and the engine check tool (``check``)."""
