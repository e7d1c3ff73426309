"""Running ONNX models on the build host with ONNX Runtime: the one place sessions are made
(``sessions``: options, sessions that also return intermediate tensors, feeding and running) and
latency is measured (``timing``: single-model medians, interleaved rounds). Compression, analysis,
loading, targets and search use it; the device side has its own runtime (``agent.runtime``)."""
