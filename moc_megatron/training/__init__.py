"""Training on the DeepSpeed engine (entry point: moc_megatron/train.py).

    trainer     build the run, resume, loop: step, log, evaluate, save
    engine      DeepSpeed JSON from flags, ZeRO 0/1/2, the engine around our AdamW
    optim       the three optimizer groups, no-decay halves, megatron-core's schedule
    step        Steps: forward/backward per micro-batch, the update, the NaN policy, an evaluation batch
    pipeline_step  PipelineSteps: the same interface on DeepSpeed's PipelineEngine
    data        datasets and the layout-independent sample order
    metrics     progress line, JSONL, TensorBoard, throughput and MFU
    checkpoint  atomic save, latest, keep-last;  resume  exact resume, --finetune, compatibility
"""
