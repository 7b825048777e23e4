"""The Python API on the model `make demo` exported: `python examples/python_api.py`.

The seed's "Basic Usage" shape: load a tokenizer and a model, describe the run in an
`SFTConfig`, hand both datasets to `SFTTrainer` and train.
"""

import jax.numpy as jnp
from transformers import AutoTokenizer

import raysft as rs

model_dir = "runs/smollm2-unit-conversions/export"  # any Hugging Face directory, .gguf file or hub id
tokenizer = AutoTokenizer.from_pretrained(model_dir)
model = rs.AutoModelForCausalLM.from_pretrained(model_dir, dtype=jnp.bfloat16)

config = rs.SFTConfig(
    model_name="python-api",
    save_directory="runs",
    max_sequence_length=256,
    packing=True,
    total_batch_size=4,
    learning_rate=5e-5,
    learning_rate_end=5e-6,
    scheduler=rs.Schedulers.COSINE,
    optimizer=rs.Optimizers.ADAMW,
    num_train_epochs=1,
    max_training_steps=8,  # a short look; leave out to train the whole epoch
    save_steps=4,
    num_hosts=2,  # JAX worker processes: one per TPU host on a cluster
)
output = rs.SFTTrainer(
    arguments=config,
    model=model,
    train_dataset="examples/data/unit_conversions_train.jsonl",  # or a datasets.Dataset / ray.data.Dataset
    eval_dataset="examples/data/unit_conversions_eval.jsonl",
    processing_class=tokenizer,
).train()
print(f"eval loss {output.summary['eval_loss_start']:.4f} -> {output.summary['eval_loss_end']:.4f}")
print(f"exported: {output.export_dir}; report: {output.run_dir / 'report'}")
