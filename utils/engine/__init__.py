"""The compute engine shared by attacks, purification and the robustness attacks.

`runtime` (device, precision, seeds, portable results), `pipeline` (the on-device batch pipeline),
`loop` (the one training loop) and `evaluate` (the one evaluator). Callers write
`from utils import engine` and `engine.train_epoch(...)`; the names below are that surface.
"""
from utils.engine.evaluate import backdoor_metrics, batched, eval_batch_size, predict
from utils.engine.loop import LossFn, cosine_scheduler, cross_entropy_loss, load_states, train_epoch
from utils.engine.pipeline import MAX_INPUT_SIZE, Pipeline, index_batches, place_model
from utils.engine.runtime import (amp_dtype, configure_threads, cpu_has_fast_bf16, derive_seed, device_name, make_generator,
                                  resolve_device, seed_everything, seeded_init, to_cpu, versions)

__all__ = ["backdoor_metrics", "batched", "eval_batch_size", "predict", "LossFn", "cosine_scheduler", "cross_entropy_loss",
           "load_states", "train_epoch", "MAX_INPUT_SIZE", "Pipeline", "index_batches", "place_model", "amp_dtype", "configure_threads",
           "cpu_has_fast_bf16", "derive_seed", "device_name", "make_generator", "resolve_device", "seed_everything",
           "seeded_init", "to_cpu", "versions"]
