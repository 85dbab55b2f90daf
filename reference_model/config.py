"""What a training run of llava3d-tiny is made of: the fixed architecture, and the options of both
stages as typed settings (one dataclass per concern), checked once before anything is trained.

The defaults are the command-line defaults of ``python -m reference_model.train``; the bundled
model's own settings are in ``adatoken_compile/models/llava3d_tiny/TRAINING.json``.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from adatoken_compile.errors import InputError

# Architecture: the LLaVA-3D-7B layout at toy size. Not options: the bundled checkpoint, the
# stage-1 cache key and the tests assume these.
VISION = dict(hidden_size=96, intermediate_size=384, num_hidden_layers=3, num_attention_heads=4, image_size=224, patch_size=14)
DECODER = dict(hidden_size=128, num_hidden_layers=8, num_attention_heads=4, num_key_value_heads=4, intermediate_size=384,
               max_position_embeddings=4096, rms_norm_eps=1e-5, tie_word_embeddings=False)
VISION_PATCHES = (VISION["image_size"] // VISION["patch_size"]) ** 2  # patches of one view
DENSE_FROM = ("question", "key-word")


@dataclass(frozen=True)
class ReadOut:
    """A training-only linear read-out (not saved) of the decoder's hidden state after decoder
    layer ``layer``, with loss weight ``weight`` (0: off)."""

    weight: float = 0.0
    layer: int = 4

    def record(self) -> dict | None:
        """What TRAINING.json says of it: None when off."""
        return {"weight": self.weight, "layer": self.layer} if self.weight else None


@dataclass(frozen=True)
class VisionConfig:
    """Stage 1: the CLIP-architecture tower learns per-patch class and colour labels."""

    scenes: int = 120
    steps: int = 400
    object_weight: float = 1.0  # loss weight of object patches relative to floor / wall / ceiling ones
    views: int | None = None  # random views per scene (None: all 20)
    cache: str | None = None  # reuse a tower saved here with the same settings and scene code


@dataclass(frozen=True)
class DecoderConfig:
    """How the stage-2 modules start."""

    embed_std: float = 0.3  # text embeddings at the scale of the projected scene tokens
    rope_theta: float = 10000.0
    pe_scale: float = 1.0  # the 3D position embedding's last layer starts this many times larger


@dataclass(frozen=True)
class DataConfig:
    """Which training scenes and questions stage 2 sees."""

    scenes: int = 1200
    relation_draws: int = 4  # draws of the evaluation generator's relation questions per scene
    templates: tuple[str, ...] | None = None  # only these question templates (None: all)


@dataclass(frozen=True)
class ScheduleConfig:
    """How long stage 2 runs, its learning rate, and what it sees when."""

    epochs: float = 2.0
    scenes_per_step: int = 1  # gradient accumulation
    lr: float = 1.5e-3
    lr_decay_frac: float | None = None  # constant rate, then a cosine over this last share (None: whole-run cosine)
    minutes: float | None = None  # wall-time budget of the whole run
    curriculum_views: int = 0  # views per scene during the first curriculum_frac of the steps (0: off)
    curriculum_frac: float = 0.3
    bg_curriculum: float = 0.0  # share of the steps over which room voxels are phased in
    bg_keep_max: float = 1.0  # share of room voxels kept at the end of that phase-in
    bg_hold: float = 0.0  # keep bg_keep_max of the room voxels until this share of the steps
    template_stages: tuple[tuple[str, ...], ...] | None = None  # cumulative template curriculum
    template_frac: float = 0.5  # share of the steps the template curriculum spans


@dataclass(frozen=True)
class LossConfig:
    """What stage 2 is trained to predict besides the answer: deep supervision, alignment losses
    and the training-only read-outs."""

    dense_answer: float = 0.0  # weight of the answer target at the question positions (0: off)
    dense_from: str = "question"  # where those targets start: one of DENSE_FROM
    count_balance: bool = False  # weight counting questions by 1 / frequency of their answer
    aux_weight: float = 0.0  # class / colour words predicted at object scene tokens
    align_weight: float = 0.0  # projected object tokens tied to their word embeddings
    position_weight: float = 0.0  # each scene token's voxel centre read from the decoder's input
    locate: ReadOut = ReadOut(0.0, 4)  # floor position of the object a class / colour word names
    instance: ReadOut = ReadOut(0.0, 3)  # first token of each object instance
    distance: ReadOut = ReadOut(0.0, 5)  # both compared distances at a relation's last position
    candidate_distance: ReadOut = ReadOut(0.0, 4)  # each candidate's distance at its colour word
    compare: ReadOut = ReadOut(0.0, 7)  # which candidate is closer, at the second candidate's word

    def read_outs(self) -> dict[str, ReadOut]:
        """The read-outs of the decoder's hidden states by field name (flag ``--NAME-weight`` with
        "-" for "_")."""
        return {"locate": self.locate, "instance": self.instance, "distance": self.distance,
                "candidate_distance": self.candidate_distance, "compare": self.compare}


@dataclass(frozen=True)
class TrainConfig:
    """Every option of a training run. ``decoder_seed`` seeds stage 2 (decoder init, scene order,
    curricula; None: ``seed``), so that one cached tower serves several decoder seeds."""

    seed: int = 0
    decoder_seed: int | None = None
    workers: int = 0  # background processes that render scenes while training runs
    vision: VisionConfig = field(default_factory=VisionConfig)
    decoder: DecoderConfig = field(default_factory=DecoderConfig)
    data: DataConfig = field(default_factory=DataConfig)
    schedule: ScheduleConfig = field(default_factory=ScheduleConfig)
    loss: LossConfig = field(default_factory=LossConfig)

    @property
    def stage2_seed(self) -> int:
        return self.seed if self.decoder_seed is None else self.decoder_seed

    def validate(self) -> None:
        """Raise a one-line :class:`InputError` naming the flag of the first bad option."""
        from adatoken_compile.benchmark3d.questions import TEMPLATES

        s, loss = self.schedule, self.loss
        for names, where in [(self.data.templates or (), "")] + [(st, " in --template-curriculum") for st in s.template_stages or ()]:
            bad = sorted(set(names) - set(TEMPLATES))
            if bad:
                raise InputError(f"train: unknown question template(s) {', '.join(bad)}{where}; choose from {', '.join(TEMPLATES)}")
        if loss.dense_from not in DENSE_FROM:
            raise InputError(f"train: --dense-from {loss.dense_from!r} is not one of {', '.join(DENSE_FROM)}")
        for name, r in loss.read_outs().items():
            check_read_out(name.replace("_", "-"), r)
        if s.lr_decay_frac is not None and not 0.0 < s.lr_decay_frac <= 1.0:
            raise InputError(f"train: --lr-decay-frac {s.lr_decay_frac} must be in (0, 1] (the share of the steps the decay spans)")
        if loss.position_weight < 0 or self.decoder.pe_scale <= 0:
            raise InputError(f"train: --position-weight {loss.position_weight} must be >= 0 and --pe-scale {self.decoder.pe_scale} > 0")
        if self.workers < 0:
            raise InputError(f"train: --workers {self.workers} must be >= 0 (background processes that render scenes; 0: none)")
        if self.data.relation_draws < 0:
            raise InputError(f"train: --relation-draws {self.data.relation_draws} must be >= 0 (draws of the relation generator per scene)")
        if not 0.0 <= s.bg_hold < 1.0 or not 0.0 < s.bg_keep_max <= 1.0:
            raise InputError(f"train: --bg-hold {s.bg_hold} must be in [0, 1) (the share of the steps that keep only "
                             f"--bg-keep-max of the room voxels) and --bg-keep-max {s.bg_keep_max} in (0, 1]")
        if s.template_stages and not 0.0 < s.template_frac <= 1.0:
            raise InputError(f"train: --template-frac {s.template_frac} must be in (0, 1] (the share of the steps the curriculum spans)")


def check_read_out(flag: str, read_out: ReadOut) -> None:
    """One-line error for a read-out's --FLAG-weight (>= 0) and --FLAG-layer (a decoder layer,
    checked only when the read-out is on)."""
    n = DECODER["num_hidden_layers"]
    weight, layer = read_out.weight, read_out.layer
    if weight < 0 or (weight and not 1 <= layer <= n):
        raise InputError(f"train: --{flag}-weight {weight} must be >= 0 and --{flag}-layer {layer} 1..{n} (decoder layers)")
