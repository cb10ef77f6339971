"""The training engine, cut by concern (read top-down):

- `config`: load, check and save configs; the command line every script takes;
- `run`: what a script run works with (`Run`), starting and ending it;
- `distributed`: process group, ranks, gathers and DDP;
- `precision`: autocast dtype and loss scaling;
- `optim`: the optimizer and the one learning-rate function;
- `train`: the one epoch loop (`fit`) of fine-tuning and pre-training, checkpoints;
- `logs`: console lines, progress bars, log.jsonl, TensorBoard scalars, result files
  and the end-of-run summary.

Modules import only what they need, so `models` can import `engine.distributed`
without pulling in the rest.
"""
