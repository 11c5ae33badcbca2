"""The settings, as dataclasses with one docstring per field (the README's reference is generated from them).

Precedence is CLI > YAML file > defaults; `launch.config.parse` reads and applies them and
`launch.config.validate` checks every range in one place. A setting with fixed choices says them in
its type (`Literal[...]`), so parsing refuses any other value with the list.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal, Optional


@dataclass
class RunConfig:
    dir: str = ""
    """Run directory (config.yaml, metrics.jsonl, checkpoints/, model.pt). Empty: runs/<name>."""
    name: str = ""
    """Run name, used for the default run directory. Empty: the config file's stem, else 'default'."""


@dataclass
class LoraConfig:
    r: int = 0
    """LoRA rank: adapters of this rank on model.lora.targets train, the base stays frozen (needs the extra .[peft]). 0: off, every parameter trains (full fine-tuning)."""
    alpha: float = 16.0
    """LoRA scaling numerator: an adapter's update is scaled by alpha / r."""
    dropout: float = 0.0
    """Dropout on the adapters' input (0: none, and runs stay exact against one process)."""
    targets: list[str] = field(default_factory=lambda: ["all-linear"])
    """Modules that get adapters: names (the last part, e.g. [q_proj, v_proj], or a full dotted name) or ['all-linear'] (every linear layer but the output head)."""


@dataclass
class ModelConfig:
    name: str = "mlp"
    """'mlp' (the seeds' NeuralNetwork: Linear-ReLU-...-Linear, logits out) or an import path 'pkg.module:Class'; with model.pretrained a class with from_pretrained, e.g. transformers:AutoModelForCausalLM."""
    pretrained: str = ""
    """A local Hugging Face checkpoint directory (config.json and *.safetensors or pytorch_model*.bin): the model is model.name's Class.from_pretrained(DIR, **model.kwargs). Under dist.strategy=fsdp it is built on the meta device and each rank reads only its own shards. Empty: the model is built from model.kwargs."""
    init_from: str = ""
    """Start from these weights: a model.pt, a file written by launch export, or a finished run directory (its model.pt). Loaded strictly (a mismatch is one line naming the keys and shapes); a LoRA run's model.pt holds adapters and loads onto the same base. Empty: off."""
    lora: LoraConfig = field(default_factory=LoraConfig)
    """LoRA adapters (model.lora.r, .alpha, .dropout, .targets); see docs/finetune.md."""
    hidden: list[int] = field(default_factory=lambda: [300, 200])
    """Hidden layer widths of the MLP (the seeds use 300*scale, 200*scale)."""
    in_features: Optional[int] = None
    """Input width. Empty: taken from the dataset."""
    out_features: Optional[int] = None
    """Number of logits. Empty: the dataset's number of classes; if set it must match it."""
    kwargs: dict = field(default_factory=dict)
    """Keyword arguments for an import-path model class. A nested mapping with `_target_: pkg.module:Name` is built first (Hydra's convention; `_args_` for positional arguments), e.g. `config: {_target_: transformers:GPT2Config, n_layer: 2}`. On the command line model.kwargs.KEY=VALUE (nested: model.kwargs.a.b=1) and model.kwargs={...} merge into the file's mapping; KEY=null removes a key, model.kwargs=null empties it."""
    loss_arg: str = ""
    """A model that computes its own loss in forward: the keyword it takes the target under ('labels' for Hugging Face, 'targets' for nanoGPT). The launcher passes the target there and uses the returned loss (.loss, ['loss'] or the scalar in a tuple) instead of train.loss. Empty: off."""
    loss_reduction: Literal["mean", "mean_shifted", "sum"] = "mean"
    """With model.loss_arg: what the model's loss is, so it is weighted exactly: 'mean' over the targets other than train.ignore_index (nanoGPT), 'mean_shifted' the same over targets shifted by one inside the model (Hugging Face causal LMs), or 'sum'. Checked on the first batch."""
    tp_plan: str = ""
    """dist.tp: how the model is split over the tensor-parallel ranks. Empty: the model's own plan (a Hugging Face model's `_tp_plan` / `config.base_model_tp_plan`, applied with torch's parallelize_module). An import path 'pkg.module:fn': fn(model, tp_mesh) applies your own (called with sequence_parallel=True under dist.sequence_parallel). Ignored at dist.tp=1, so a run may resume there. See docs/sharding.md."""


@dataclass
class DataConfig:
    name: str = "synthetic"
    """'toy' (the seeds' 5+2 points), 'synthetic', 'csv', 'npz', 'mnist', 'tokens' (a token file as nanoGPT writes it), 'parquet', 'jsonl', 'hf' (corpora on disk, read by row group: see docs/data.md), 'sft' (prompt/response or chat rows for fine-tuning, docs/finetune.md), or an import path 'pkg.module:Class' (a Dataset, or an IterableDataset stream)."""
    batch_size: int = 32
    """Training batch size PER PROCESS. The global batch is batch_size x world_size (x train.accum_steps)."""
    eval_batch_size: int = 256
    """Evaluation batch size per process (does not change results)."""
    n_train: int = 4096
    """synthetic: number of training samples."""
    n_eval: int = 1024
    """synthetic: number of evaluation samples."""
    features: int = 100
    """synthetic: input features (the seeds use 100*scale)."""
    classes: int = 2
    """synthetic: number of classes."""
    learnable: bool = True
    """synthetic: labels from a fixed random teacher network (True) or uniformly random labels as in the seeds' benchmark (False)."""
    seed: int = 1234
    """Seed for generating or splitting the data (independent of train.seed, identical on every rank)."""
    path: str = ""
    """File or directory for file-based datasets (csv, npz, mnist, tokens); parquet, jsonl, hf: a file, a directory or a glob (hf: a datasets.save_to_disk directory or Arrow files); sft: JSONL, JSON or Parquet files, a glob allowed (e.g. data/*.jsonl)."""
    kwargs: dict = field(default_factory=dict)
    """Keyword arguments for an import-path Dataset class (it must also accept split='train'|'eval'); `_target_` entries are built as in model.kwargs. Overridden like model.kwargs: data.kwargs.KEY=VALUE merges, null removes."""
    collate: str = ""
    """Import path 'pkg.module:fn' of a collate function (a list of items -> a batch), e.g. padding variable-length sequences with -100 targets. Empty: torch's default_collate."""
    seed_samples: bool = True
    """Seed torch, random and numpy before loading each sample with (train.seed, epoch, index), so random augmentation is the same for any data.num_workers, world size and resume point (Dataset and stream items; about 10 us per sample in a worker, 85 us in the main process)."""
    eval_max_samples: int = 0
    """Evaluate on the first this many samples of the evaluation split (0: all; needed for an endless evaluation stream)."""
    num_workers: int = 0
    """DataLoader workers for datasets that are not in-memory tensors (in-memory data is sliced on the device)."""
    pin_memory: Literal["auto", "true", "false"] = "auto"
    """'auto' (on with CUDA), 'true' or 'false'; DataLoader path only."""
    target: str = ""
    """csv, parquet, jsonl, hf: the label column, by name (with data.header) or 0-based index (without; csv); empty: the last column. Integer or string labels (corpora: integers are class indices); their names are saved with the run."""
    header: bool = True
    """csv: the first line names the columns. false: no header, columns are addressed by index."""
    ignore: list[str] = field(default_factory=list)
    """csv: columns to leave out of the features (e.g. an id column), by name or index like data.target."""
    val_fraction: float = 0.2
    """csv, npz, sft: fraction of the rows held out for evaluation (a seeded split by data.seed) when data.val_path is empty; tokens: the last fraction of the file."""
    val_path: str = ""
    """csv, npz, tokens, sft: a separate evaluation file (same columns/keys/token type as data.path, e.g. nanoGPT's val.bin); parquet, jsonl, hf: the same kinds as data.path. Then all of data.path trains (corpora without it hold out data.val_fraction of their units, chosen by data.seed)."""
    seq_len: int = 0
    """tokens, and text corpora (data.text): tokens per window (the model's context length); required for data.name=tokens and with data.text."""
    stride: int = 0
    """tokens: tokens between window starts (0: data.seq_len, windows side by side; 1: every offset)."""
    token_dtype: Literal["uint16", "uint32"] = "uint16"
    """tokens: the token file's integer type (nanoGPT writes uint16; vocabularies over 65,535 need uint32)."""
    x_key: str = "x"
    """npz: name of the feature array (first axis = samples)."""
    y_key: str = "y"
    """npz: name of the label array (integers or strings, one per sample)."""
    standardize: bool = True
    """csv, npz: standardise each feature with the training split's mean and std (saved with the run; predict applies the same)."""
    feature_columns: list[str] = field(default_factory=list)
    """parquet, jsonl, hf: the feature columns (numbers, or lists of numbers: each becomes that many features); empty: every numeric column but data.target. (data.features is the synthetic data's count.)"""
    text: str = ""
    """parquet, jsonl, hf: train a language model on this text column: documents tokenized with data.tokenizer, each followed by its EOS, joined and cut into windows of data.seq_len + 1 tokens (the next-token loss over every window token). Empty: tabular rows (data.target, data.feature_columns)."""
    tokenizer: str = ""
    """A Hugging Face tokenizer directory (as save_pretrained writes it: tokenizer.json / tokenizer_config.json), loaded from disk only. Text corpora (data.text) need one with an EOS token; sft: empty means model.pretrained's."""
    max_length: int = 0
    """sft: tokens per row at most (prompt and response together); longer rows are cut at the end and counted at start-up. 0: the base model's max_position_embeddings (model.pretrained's config.json), else no limit."""
    unit_rows: int = 0
    """parquet, jsonl, hf: rows per unit of the epoch order (units are shuffled whole; blocks mix them), counted over the files end to end. 0: each row group / record batch / JSONL block of 1024 lines is a unit. The same rows with the same unit_rows give the same order in any format; keep row groups a multiple of it (a row group is decoded whole)."""
    shuffle_window: int = 0
    """parquet, jsonl, hf: samples per block of the epoch order (rounded down to a whole number of global micro-batches); a micro-batch mixes every unit of its block, and each rank holds about shuffle_window / world_size decoded samples. 0: about 64 units, at most 256 MiB of samples."""
    cache_mb: int = 128
    """parquet, jsonl, hf: decoded units and their samples kept per process (an LRU), in MiB: units at block edges are decoded once."""
    index_dir: str = ""
    """parquet, jsonl, hf: where the JSONL line index and text token counts are cached; empty: .launch-index/ beside the data if it may be written, else ~/.cache/launch/corpus-index."""
    accept_corpus_change: bool = False
    """parquet, jsonl, hf: resume although the corpus's files were added, removed or changed since the checkpoint (refused otherwise); the interrupted epoch starts its order afresh on the files as they are."""
    many_classes: bool = False
    """csv, npz: confirm that a numeric target with many distinct values (over 20, under 5 rows per value on average) is class labels; without it a classification loss on such a target stops with a hint to train.loss=mse."""


@dataclass
class TrainConfig:
    # What is trained, for how long, from which seed
    epochs: int = 5
    """Number of passes over the training data."""
    seed: int = 0
    """Seed for model initialisation and the per-epoch shuffle (the permutation is a pure function of seed and epoch)."""
    max_steps: int = 0
    """Stop after this many optimizer steps in total (0: train.epochs decide). Required for a stream (an IterableDataset without a length)."""
    loss: str = "cross_entropy"
    """'cross_entropy' (logits [N, C] or sequences [N, T, C] / [N, C, T] with integer targets; ignore_index -100), 'mse', 'l1', 'bce_with_logits', or an import path 'pkg.module:fn' to fn(output, target) -> per-element losses. A model with a loss(batch) method uses that instead, and a Lightning LightningModule its training_step (a mean over the batch's samples)."""

    ignore_index: int = -100
    """Targets with this value are not counted by cross_entropy and model losses (-100 for PyTorch and Hugging Face; nanoGPT uses -1)."""
    metrics: list[str] = field(default_factory=lambda: ["auto"])
    """Evaluation metrics, each recorded as eval_<name> over the whole evaluation split (every sample once, the same for any world size): 'accuracy', 'top5', 'f1_macro', 'auroc' (classification and bce_with_logits; per token for sequences, ignored targets left out; auroc is binary or one-vs-rest macro, not per token over more than 2 classes), 'mse', 'mae' (regression), or an import path 'pkg.module:fn', called once as fn(predictions, targets) -> float on all model outputs and targets in sample order (recorded as eval_fn). 'auto': accuracy for classification losses, as always. A metric that does not fit the task stops the run at start. See docs/data.md."""

    # The optimizer step
    optimizer: Literal["sgd", "adamw"] = "sgd"
    """'sgd' or 'adamw'."""
    lr: float = 0.1
    """Peak learning rate."""
    momentum: float = 0.0
    """SGD momentum."""
    weight_decay: float = 0.0
    """Weight decay (decoupled for AdamW)."""
    accum_steps: int = 1
    """Gradient accumulation: micro-batches per optimizer step (DDP syncs only on the last)."""
    global_batch: int = 0
    """Samples per optimizer step over all processes, kept at any world size: each process then takes global_batch / world_size samples per step, in micro-batches of at most data.batch_size (the fewest train.accum_steps that fit), so a run resumed on fewer or more processes continues with the same steps. 0: the global batch is data.batch_size x world_size x train.accum_steps."""
    grad_clip: float = 0.0
    """Clip the global gradient norm to this value; 0 turns clipping off."""
    ema_decay: float = 0.0
    """Keep an exponential moving average of the parameters with this decay (e.g. 0.999), updated after every optimizer step, checkpointed, evaluated each epoch (eval_loss_ema, ...) and saved as model_ema.pt; 0 turns it off."""
    ema_warmup_steps: int = 0
    """Ramp the EMA's decay up linearly over this many optimizer steps (0: the full decay from the first step)."""

    # The learning-rate schedule
    schedule: Literal["constant", "step", "cosine"] = "constant"
    """LR schedule per optimizer step: 'constant', 'step' or 'cosine' (all with train.warmup_steps of linear warmup)."""
    warmup_steps: int = 0
    """Linear warmup steps from 0 to train.lr."""
    step_every: int = 1000
    """'step' schedule: multiply the LR by train.gamma every this many optimizer steps."""
    gamma: float = 0.1
    """'step' schedule: decay factor."""
    min_lr_ratio: float = 0.0
    """'cosine' schedule: final LR as a fraction of train.lr."""

    # Agreement between ranks
    check_every_steps: int = 10
    """Every this many optimizer steps the ranks agree on stop requests and non-finite losses (one tiny all-reduce)."""

    # Where and how fast
    device: Literal["auto", "cpu", "cuda", "mps"] = "auto"
    """'auto' (CUDA, then MPS for a single process, then CPU), 'cpu', 'cuda' or 'mps'."""
    precision: Literal["fp32", "bf16", "fp16"] = "fp32"
    """'fp32', 'bf16' or 'fp16' (autocast; fp16 uses a GradScaler)."""
    cuda_graphs: Literal["auto", "on", "off"] = "auto"
    """Capture the whole optimizer step in one CUDA graph and replay it: 'auto' (on for a single CUDA process with in-memory data and a launch-bound model, once the GPU lane has measured it), 'on' or 'off'."""
    compile: bool = False
    """Wrap the model in torch.compile (checkpoints stay prefix-free)."""
    activation_checkpointing: bool = False
    """Recompute each block's activations in the backward instead of keeping them (blocks as dist.fsdp_blocks picks them): less memory, about one more forward of compute."""
    compile_mode: Literal["default", "reduce-overhead", "max-autotune"] = "default"
    """torch.compile mode when train.compile is on: 'default', 'reduce-overhead' (CUDA graphs: for small models where kernel-launch overhead dominates; single process) or 'max-autotune'."""


@dataclass
class DistConfig:
    strategy: Literal["ddp", "fsdp"] = "ddp"
    """'ddp': every rank holds the whole model (DistributedDataParallel); 'fsdp': parameters, gradients and optimizer state sharded over the ranks (FSDP2 fully_shard per block, then the root; sharded checkpoints). See docs/sharding.md."""
    fsdp_blocks: list[str] = field(default_factory=list)
    """fsdp (and train.activation_checkpointing): class names of the blocks to shard one by one, e.g. [GPT2Block]. Empty: the children of the model's nn.ModuleLists, else its top-level children."""
    reshard_after_forward: bool = True
    """fsdp: free a block's gathered parameters after its forward (gather again for the backward): less memory, one more all-gather per block."""
    param_dtype: Literal["fp32", "bf16", "fp16"] = "fp32"
    """fsdp: the dtype parameters are gathered and computed in (MixedPrecisionPolicy); the sharded master copy stays fp32. Not exact: see docs/sharding.md."""
    reduce_dtype: Literal["fp32", "bf16", "fp16"] = "fp32"
    """fsdp: the dtype gradients are reduce-scattered in."""
    cpu_offload: bool = False
    """fsdp: keep the sharded parameters, gradients and optimizer state in host memory (CUDA only)."""
    replicate: str = "1"
    """fsdp: HSDP on a (replicate, shard) mesh: parameters sharded within groups of world / (dist.replicate x dist.tp) ranks, the groups replicas of each other (gradients reduce-scattered inside a group, then all-reduced across groups). 'auto': one replica per node (shard within a node, replicate across nodes); 1: plain FSDP over every data-parallel rank. See docs/sharding.md."""
    tp: int = 1
    """Tensor parallel over groups of this many consecutive ranks (keep them inside a node): each layer of the model's plan (model.tp_plan) split over the group, whose ranks see the same samples; the data-parallel world is world / dist.tp. Composes with dist.strategy=fsdp (FSDP x TP: TP inside, FSDP over the data-parallel ranks) and dist.replicate. 1: off."""
    sequence_parallel: bool = False
    """dist.tp: also split the activations between the tensor-parallel pairs along the sequence (the norms run on sequence shards; a colwise layer all-gathers the sequence, a rowwise one reduce-scatters it), where the plan allows: a Hugging Face plan that starts at an embedding entry and ends at a gathered output head (Llama's), or your model.tp_plan taking sequence_parallel."""
    backend: Literal["auto", "nccl", "gloo"] = "auto"
    """'auto' (nccl with CUDA, gloo otherwise), 'nccl' or 'gloo'."""
    timeout_s: float = 30.0
    """Seconds before a collective (and init_process_group) gives up, so a dead peer ends the job fast."""
    bucket_cap_mb: float = 25.0
    """DDP gradient bucket size."""
    gradient_as_bucket_view: bool = True
    """DDP: gradients alias the all-reduce buckets (saves a copy)."""
    static_graph: bool = False
    """DDP static_graph optimisation."""
    find_unused_parameters: bool = False
    """DDP: search for parameters without gradients each step (slow; only for models that need it)."""
    sync_batchnorm: Literal["auto", "true", "false"] = "auto"
    """BatchNorm statistics over the global micro-batch, so DDP equals one process for BatchNorm models: 'auto'/'true' (on when there is more than one process and the model has BatchNorm layers) or 'false' (each rank its own statistics; the run says so)."""


@dataclass
class CkptConfig:
    every_steps: int = 0
    """Save every this many optimizer steps (0: off)."""
    every_epochs: int = 1
    """Save at the end of every this many epochs (0: off). A final checkpoint is always written."""
    keep_last: int = 3
    """Keep this many newest checkpoints (>= 1)."""
    resume: str = "auto"
    """'auto' (latest valid checkpoint in the run directory, if any), 'never' (start fresh; old checkpoints are moved aside, never deleted) or a checkpoint path to start from (used only while the run directory has no checkpoint of its own, so restarts continue)."""
    async_save: bool = False
    """fsdp: write sharded checkpoints in the background (on their own process group); training waits only for the copy of its shards. The checkpoint counts once its write completes and `latest` names it."""
    barrier_timeout_s: float = 600.0
    """How long other ranks wait for rank 0 to write a checkpoint."""


@dataclass
class LogConfig:
    progress: Literal["auto", "true", "false"] = "auto"
    """tqdm progress bar on rank 0: 'auto' (when stderr is a terminal), 'true' or 'false'."""
    every_steps: int = 0
    """Also write a metrics.jsonl record every this many optimizer steps (0: per epoch only)."""
    tracker: list[str] = field(default_factory=list)
    """Experiment trackers that get rank 0's records (x axis: the optimizer step), the resolved config and model.pt's path: any of 'tensorboard' (scalars in <run dir>/tb), 'wandb' (W&B; WANDB_MODE=offline writes under <run dir>/wandb), 'mlflow' (MLFLOW_TRACKING_URI, else sqlite:///<run dir>/mlflow.db), or an import path 'pkg.module:Class' (your own). Their run ids are kept in <run dir>/trackers.json, so a rerun, restart or requeue continues the same runs. Needs the matching extra: .[tensorboard], .[wandb], .[mlflow]."""
    tensorboard: bool = False
    """Same as adding 'tensorboard' to log.tracker (kept for existing configs)."""
    project: str = ""
    """W&B project and MLflow experiment. Empty: WANDB_PROJECT / MLFLOW_EXPERIMENT_NAME when set, else 'launch'."""
    profile_steps: str = ""
    """Profile optimizer steps START:END (1-based, END inclusive) with torch.profiler on every rank into <run dir>/profile/ (TensorBoard/Perfetto traces); empty: off."""
    debug: bool = False
    """Show full tracebacks for errors in user code (model.name, data.name, train.loss), not only the one-line summary."""

    @property
    def trackers(self) -> list[str]:
        """log.tracker with log.tensorboard folded in, each name once, in the given order."""
        return list(dict.fromkeys(self.tracker + (["tensorboard"] if self.tensorboard else [])))


@dataclass
class Config:
    run: RunConfig = field(default_factory=RunConfig)
    model: ModelConfig = field(default_factory=ModelConfig)
    data: DataConfig = field(default_factory=DataConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    dist: DistConfig = field(default_factory=DistConfig)
    ckpt: CkptConfig = field(default_factory=CkptConfig)
    log: LogConfig = field(default_factory=LogConfig)

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    @property
    def run_dir(self) -> Path:
        return Path(self.run.dir)
