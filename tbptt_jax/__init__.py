"""tbptt_jax: backpropagation through time and its exact truncated forms in JAX.

The recurrence is a `jax.lax.scan` over a cell `cell(params, carry, x_t) ->
(carry, y_t)`; truncation is `jax.lax.stop_gradient` on the carried state at
the start of each backward window; a jitted update consumes the chunks of a
long sequence in order. Modules, one idea each:

  cells       the cell contract; the Elman cell; Flax cells; stacking
  linear_rnn  the Linear Recurrent Unit `lru` (Orvieto et al. 2023), windows as a parallel scan;
              `online_lru`, with the diagonal online sensitivities of Zucchet et al. (2023)
  rtrl        real-time recurrent learning: the untruncated gradient online, `rtrl_cell`
  unroll      lax.scan over time, carry in / carry out, resets
  truncation  TBPTT(k1, k2), window and per-loss styles: `Truncation`, the
              engine `cell_gradients` and its loose-function form `tbptt_gradients`
  streams     parallel streams of one long sequence: `batchify`, chunks
  train       the optax-style training factory `tbptt_trainer`
  adaptive    adaptive k2 for a tolerated bias (Aicher et al. 2019)
  artbp       unbiased random truncation, ARTBP (Tallec & Ollivier 2017)
  sharding    data-parallel training over devices and hosts: `data_mesh`
  checkpoint  whole-run checkpoints, atomic and checksummed
  diagnostics per-lag gradient norms, Jacobian products, truncation bias
  plots       figures of the diagnostics and training metrics (matplotlib)
  data        word- and character-level corpora and vocabularies
  lm          language models: Zaremba et al. presets, perplexity, sampling
  synthetic   the r2rt synthetic task and its reference losses
  interop     cells and layers from Flax NNX, Equinox and Haiku: `interop.nnx_cell`, ...
  tensorboard training metrics as TensorBoard event files: `TensorBoardWriter`
  cli/        the `tbptt-jax` command (an application of the library; nothing imports it)

The names below are the public API. Each module's other public names (such
as `truncation.block_gradients`, `truncation.scan_blocks`, `unroll.scan_steps`)
are the engine's building blocks, documented for those who extend it.
"""

from tbptt_jax import (
  adaptive,
  artbp,
  checkpoint,
  data,
  diagnostics,
  interop,
  linear_rnn,
  lm,
  plots,
  rtrl,
  sharding,
  synthetic,
)
from tbptt_jax.adaptive import K2Choice as K2Choice
from tbptt_jax.adaptive import adaptive_k2 as adaptive_k2
from tbptt_jax.artbp import ARTBP as ARTBP
from tbptt_jax.artbp import ARTBPCarry as ARTBPCarry
from tbptt_jax.artbp import artbp_cell as artbp_cell
from tbptt_jax.cells import CELL_NAMES as CELL_NAMES
from tbptt_jax.cells import Cell as Cell
from tbptt_jax.cells import ElmanParams as ElmanParams
from tbptt_jax.cells import cell_by_name as cell_by_name
from tbptt_jax.cells import elman as elman
from tbptt_jax.cells import elman_step as elman_step
from tbptt_jax.cells import feedforward as feedforward
from tbptt_jax.cells import flax_cell as flax_cell
from tbptt_jax.cells import from_step as from_step
from tbptt_jax.cells import full_step as full_step
from tbptt_jax.cells import stack as stack
from tbptt_jax.cells import with_embed as with_embed
from tbptt_jax.cells import with_head as with_head
from tbptt_jax.linear_rnn import LRUParams as LRUParams
from tbptt_jax.linear_rnn import LRUTraces as LRUTraces
from tbptt_jax.linear_rnn import lru as lru
from tbptt_jax.linear_rnn import lru_block as lru_block
from tbptt_jax.linear_rnn import online_lru as online_lru
from tbptt_jax.rtrl import RTRLCarry as RTRLCarry
from tbptt_jax.rtrl import rtrl_cell as rtrl_cell
from tbptt_jax.sharding import data_mesh as data_mesh
from tbptt_jax.streams import batchify as batchify
from tbptt_jax.streams import iterate_chunks as iterate_chunks
from tbptt_jax.train import Trainer as Trainer
from tbptt_jax.train import TrainState as TrainState
from tbptt_jax.train import UpdateMetrics as UpdateMetrics
from tbptt_jax.train import tbptt_trainer as tbptt_trainer
from tbptt_jax.truncation import Lookback as Lookback
from tbptt_jax.truncation import StreamState as StreamState
from tbptt_jax.truncation import Truncation as Truncation
from tbptt_jax.truncation import cell_gradients as cell_gradients
from tbptt_jax.truncation import tbptt_gradients as tbptt_gradients
from tbptt_jax.unroll import unroll as unroll

__version__ = "0.1.0"

__all__ = (
  "ARTBP",
  "ARTBPCarry",
  "CELL_NAMES",
  "Cell",
  "ElmanParams",
  "K2Choice",
  "LRUParams",
  "LRUTraces",
  "Lookback",
  "RTRLCarry",
  "StreamState",
  "TrainState",
  "Trainer",
  "Truncation",
  "UpdateMetrics",
  "adaptive",
  "adaptive_k2",
  "artbp",
  "artbp_cell",
  "batchify",
  "cell_by_name",
  "cell_gradients",
  "checkpoint",
  "data",
  "data_mesh",
  "diagnostics",
  "interop",
  "elman",
  "elman_step",
  "feedforward",
  "flax_cell",
  "from_step",
  "full_step",
  "iterate_chunks",
  "linear_rnn",
  "lm",
  "lru",
  "lru_block",
  "online_lru",
  "plots",
  "rtrl",
  "rtrl_cell",
  "sharding",
  "stack",
  "synthetic",
  "tbptt_gradients",
  "tbptt_trainer",
  "unroll",
  "with_embed",
  "with_head",
)
