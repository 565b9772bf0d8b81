"""Every configuration key, defined once, with its default and a one-line comment.

YAML files in ``configs/`` only override these. The sections mirror the data flow: ``model`` (the decoder),
``data`` (loading), ``train`` (the optimisation loop shared by both stages), ``scst`` (what the self-critical
stage adds) and ``eval`` (decoding for validation and evaluation).
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Literal

# The words a key may take; butd.config.load checks every value against its key's Literal.
AttentionKind = Literal["additive", "dot"]
FeatureCache = Literal["none", "memory", "gpu"]
DeviceName = Literal["auto", "cpu", "cuda"]
PrecisionName = Literal["auto", "fp32", "bf16"]
BaselineKind = Literal["mean", "greedy"]
StepRunnerKind = Literal["eager", "static", "cuda_graph"]


@dataclass
class ModelConfig:
    name: str = "updown"  # registered captioner: updown | showtell | showattendtell
    feature_dim: int = 2048  # size of one region feature in the store
    rnn_size: int = 1000  # hidden size of each LSTM
    att_hid_size: int = 512  # hidden size of the additive attention
    input_encoding_size: int = 1000  # word (and region) embedding size
    embed_features: bool = True  # embed regions with Linear+ReLU+dropout before attention
    dropout: float = 0.5  # dropout on embeddings and the language LSTM output
    box_geometry: bool = False  # append normalised x1,y1,x2,y2,area to each region feature
    init_state_from_image: bool = False  # showtell: image initialises h0/c0 instead of being the first input
    attention: AttentionKind = "additive"  # showattendtell: additive | dot (scaled dot-product)
    doubly_stochastic_weight: float = 1.0  # showattendtell: lambda of sum_i (1 - sum_t alpha_ti)^2 in the XE loss


@dataclass
class DataConfig:
    num_workers: int = 2  # DataLoader worker processes (0 reads in the main process)
    cache: FeatureCache = "none"  # none | memory | gpu: keep every region feature of a split resident
    max_boxes: int = 0  # keep at most this many regions per image (0: all)


@dataclass
class TrainConfig:
    batch_size: int = 10  # images per batch (each contributes seq_per_img captions)
    seq_per_img: int = 5  # captions per image per step
    max_epochs: int = 30  # epochs of this stage
    lr: float = 5.0e-4  # Adam learning rate at the start of the stage
    lr_decay_every: int = 3  # epochs between learning-rate decays (0: constant)
    lr_decay_rate: float = 0.8  # multiplier applied at each decay
    warmup_iters: int = 0  # linear learning-rate warm-up over this many iterations
    weight_decay: float = 0.0  # Adam weight decay
    grad_clip: float = 0.1  # clip each gradient value to [-grad_clip, grad_clip] (0: off)
    label_smoothing: float = 0.0  # XE label smoothing
    compile: bool = False  # torch.compile the per-word decoder step (inductor; first steps pay the compile time)
    packed_xe: bool = True  # XE on length-sorted shrinking batches, logits for real tokens only (same loss, faster)
    step_runner: StepRunnerKind = "eager"  # eager | static (fixed shapes, no host sync) | cuda_graph (static, captured)
    scheduled_sampling_start: int = -1  # epoch at which scheduled sampling starts (-1: never)
    scheduled_sampling_increase_every: int = 5  # epochs between increases of the sampling probability
    scheduled_sampling_increase_prob: float = 0.05  # increase per step
    scheduled_sampling_max_prob: float = 0.25  # ceiling of the sampling probability
    seed: int = 42  # seeds model init, data order and sampling
    device: DeviceName = "auto"  # auto | cpu | cuda
    precision: PrecisionName = "auto"  # auto (bf16 on CUDA, fp32 on CPU) | fp32 | bf16
    max_bad_steps: int = 20  # abort after this many non-finite losses in a row
    divergence_factor: float = 100.0  # stop when |loss| exceeds this many times its running level (0: off)
    val_every_epochs: int = 1  # validate every this many epochs
    val_max_images: int = 0  # validate on at most this many val images (0: all)
    checkpoint_every_iters: int = 0  # also write last.pt every this many iterations (0: only per epoch)
    log_every: int = 50  # iterations between TensorBoard/tqdm updates
    tensorboard: bool = True  # write TensorBoard events when tensorboard is installed


@dataclass
class ScstConfig:
    num_samples: int = 5  # sampled captions per image
    baseline: BaselineKind = "mean"  # mean (Luo 2020: mean reward of the other samples) | greedy (Rennie et al. 2017)
    max_length: int = 16  # maximum sampled caption length
    temperature: float = 1.0  # sampling temperature
    bleu_weight: float = 0.0  # reward = CIDEr-D + bleu_weight * BLEU-4
    count_eos: bool = True  # the end token counts as a word in the CIDEr-D reward (see docs/formats.md)
    suppress_unk: bool = True  # samples (and the greedy baseline) never contain <unk>


@dataclass
class EvalConfig:
    beam_size: int = 3  # beam width for evaluation (1: greedy)
    max_length: int = 16  # maximum decoded caption length
    min_length: int = 1  # no <eos> before this many words (1: never an empty caption)
    length_penalty: float = 0.0  # beam score / length**length_penalty (0: off)
    block_trigrams: bool = True  # forbid a caption (greedy) or beam from repeating a trigram (see docs/evaluation.md)
    suppress_unk: bool = True  # never emit <unk> (false: the raw model's choice; see docs/evaluation.md)
    decoding_constraint: bool = True  # forbid the same word twice in a row (see docs/evaluation.md)
    batch_size: int = 100  # images per decoding batch


@dataclass
class Config:
    model: ModelConfig = field(default_factory=ModelConfig)
    data: DataConfig = field(default_factory=DataConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    scst: ScstConfig = field(default_factory=ScstConfig)
    eval: EvalConfig = field(default_factory=EvalConfig)
