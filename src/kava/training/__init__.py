"""The components the training recipe (`kava.train`) composes, each testable on its own.

    logger.py     the metric logger: metrics.jsonl, TensorBoard, W&B, stdout (main process only)
    progress.py   the start summary and the progress line printed without a terminal
    graphs.py     CUDA graphs of the micro-step (`optim.cuda_graphs`)
    gradshare.py  per-term gradient norms (`run.grad_share_every`)

The loss itself is `kava.objective`; checkpoints and the training state are `kava.checkpoint`.
"""
