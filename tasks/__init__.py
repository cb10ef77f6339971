"""Task definitions: for each script, its settings (the schema is their composition),
its training losses and its evaluation protocol.

- `retrieval`: VTC + VTM fine-tuning; ITM re-ranking of the top-k candidates, R@K.
- `videoqa`: weighted answer NLL; answer ranking or generation, accuracy.
- `pretraining`: VTC + VTM + captioning with warmup and the step/cosine schedule.
"""
