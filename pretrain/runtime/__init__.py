"""The runtime layer: process groups (`dist`), the DeepSpeed JSON (`ds_config`, `ds_schema`), optimizers
(`pertensor`, `lamb`, `optim`), schedules, the engine (`engine`: the one module that imports DeepSpeed at the
top), checkpoints (`checkpoint`, `resume`, `weights`, `integrity`, `safe_load`) and FLOP/throughput accounting
(`throughput`). It imports the models layer and below, never the rest of pretrain (tests/test_layers.py).
"""
