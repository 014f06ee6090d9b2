"""How examples are divided between JAX processes, and how eval batches are padded.

Pure integer arithmetic (no TensorFlow, no JAX) so that the rules every pipeline follows are
stated once and can be tested exhaustively:

* Process p of P reads the contiguous index range [p * n // P, (p + 1) * n // P) of a split of n
  examples. The ranges are disjoint, cover every example, and differ in size by at most one.
* The global eval batch is config.eval_batch_size, or config.batch_size when that is None or 0.
* Evaluation never drops examples: every process yields the same number of batches
  (ceil(largest shard / per-process batch)), padding its own tail with masked-out examples.
"""

from __future__ import annotations


def process_range(num_examples: int, process_index: int, process_count: int) -> tuple[int, int]:
  """Returns [start, stop) of the examples that `process_index` reads."""
  if process_count < 1 or not 0 <= process_index < process_count:
    raise ValueError(
      f"process_index={process_index} must be in [0, process_count={process_count}) "
      "and process_count >= 1."
    )
  start = process_index * num_examples // process_count
  stop = (process_index + 1) * num_examples // process_count
  return start, stop


def eval_batch_size(config) -> int:
  """The global eval batch size: config.eval_batch_size, or config.batch_size when None or 0.

  0 means "the training batch" like the other 0 defaults of the config (warmup_steps,
  reference_batch_size), which a command-line override can set where None cannot be typed.
  """
  return int(config.get("eval_batch_size") or config.batch_size)


def per_process_batch_size(global_batch_size: int, process_count: int, what: str) -> int:
  """The global batch split evenly over processes; `what` names the config key for errors."""
  if global_batch_size < 1:
    raise ValueError(f"config.{what}={global_batch_size} must be >= 1.")
  if global_batch_size % process_count:
    raise ValueError(
      f"config.{what}={global_batch_size} is not divisible by the number of JAX processes "
      f"({process_count}); use a multiple of {process_count}."
    )
  return global_batch_size // process_count


def num_eval_batches(num_examples: int, process_count: int, per_process_batch: int) -> int:
  """Batches every process yields so that the largest shard fits (at least one batch)."""
  largest_shard = -(-num_examples // process_count)
  return max(1, -(-largest_shard // per_process_batch))
