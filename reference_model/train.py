"""Train the bundled reference model ``llava3d-tiny`` from scratch on CPU.

    python -m reference_model.train --out DIR [options]     # from the repository root

``adatoken_compile/models/llava3d_tiny/TRAINING.json`` records the exact command that made the
bundled weights. Two stages, as LLaVA-3D is built from a pretrained CLIP: a CLIP-architecture
tower pretrained on per-patch class / colour labels and frozen (``reference_model.vision``), then
the 3D position embedding, projector and Llama decoder trained end to end on question answering
(``reference_model.decoder``, ``reference_model.loop``). README.md and MODEL_CARD.md in this
folder describe the recipe.
"""

from __future__ import annotations

import argparse
import shlex
import sys

import torch

from adatoken_compile.errors import InputError
from reference_model.config import (DENSE_FROM, DataConfig, DecoderConfig, LossConfig, ReadOut, ScheduleConfig,
                                    TrainConfig, VisionConfig)

# the training-only read-outs of the decoder's hidden states: flag name -> (default layer, what it reads)
READ_OUT_FLAGS = {
    "locate": (4, "weight of a training-only loss that reads, at every class/colour word naming a single object, that "
                  "object's floor position from the hidden state after --locate-layer (0: off)"),
    "instance": (3, "weight of a training-only marker loss: from the hidden state after --instance-layer, each object "
                    "scene token tells whether it is the first token of its object instance (0: off)"),
    "distance": (5, "weight of a training-only loss that reads, at each relation question's last position, the two "
                    "floor distances the answer compares from the hidden state after --distance-layer (0: off)"),
    "candidate-distance": (4, "weight of a training-only loss that reads, at each relation candidate's colour word, "
                              "its floor distance to the reference object from the hidden state after "
                              "--candidate-distance-layer (0: off)"),
    "compare": (7, "weight of a training-only logistic loss that reads, at each relation question's second candidate "
                   "word, whether the first candidate is the closer one, from the hidden state after --compare-layer "
                   "(0: off)"),
}


def command_line(argv: list[str]) -> str:
    """The command as a shell would need it typed again: arguments such as a template curriculum
    ('exist,class_of_color;count') carry shell metacharacters and must stay quoted."""
    return "python -m reference_model.train " + shlex.join(argv)


def _add_run_args(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("run")
    g.add_argument("--out", required=True)
    g.add_argument("--seed", type=int, default=0)
    g.add_argument("--decoder-seed", type=int, default=None,
                   help="seed of stage 2 (decoder init, scene order, curricula); default: --seed")
    g.add_argument("--record-eval-only", action="store_true",
                   help="only evaluate the checkpoint in --out on the fixed CI sample and record it in TRAINING.json")
    g.add_argument("--workers", type=int, default=0,
                   help="render scenes in N background processes, one core each, while training runs (stage 1's "
                        "renders, in N + 1; stage 2's first epoch, tower features included); with --threads 1 the same "
                        "weights bit for bit; on 2 cores, 1")
    g.add_argument("--threads", type=int, default=None,
                   help="torch intra-op threads of training (1 avoids OpenMP collapse on a loaded machine); with "
                        "--workers N, stage 2's first epoch trains on threads - N (at least 1) while the workers render")


def _add_vision_args(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("stage 1 (vision tower)")
    g.add_argument("--vision-scenes", type=int, default=120)
    g.add_argument("--vision-steps", type=int, default=400)
    g.add_argument("--vision-object-weight", type=float, default=1.0,
                   help="stage-1 loss weight of object patches vs floor/wall/ceiling patches")
    g.add_argument("--vision-views", type=int, default=None,
                   help="stage 1 uses this many random views of each of --vision-scenes scenes (default: all 20)")
    g.add_argument("--vision-cache", default=None,
                   help="reuse the stage-1 vision tower saved here by a run with the same seed and vision settings, "
                        "else train and save it; a trained model folder (e.g. adatoken_compile/models/llava3d_tiny) "
                        "lends its tower read-only when its TRAINING.json records the same settings")


def _add_schedule_args(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("stage 2: data and schedule")
    g.add_argument("--scenes", type=int, default=1200)
    g.add_argument("--epochs", type=float, default=2.0)
    g.add_argument("--scenes-per-step", type=int, default=1,
                   help="scenes per optimizer step (gradient accumulation; steps = scenes x epochs / this)")
    g.add_argument("--lr", type=float, default=1.5e-3)
    g.add_argument("--lr-decay-frac", type=float, default=None,
                   help="keep the learning rate constant after warm-up and decay it (cosine) over only the last "
                        "fraction F of the steps (default: cosine over the whole run)")
    g.add_argument("--minutes", type=float, default=None, help="stop decoder training after this wall time")
    g.add_argument("--curriculum-views", type=int, default=0,
                   help="views per scene during the first --curriculum-frac of the steps (0: off)")
    g.add_argument("--curriculum-frac", type=float, default=0.3)
    g.add_argument("--bg-curriculum", type=float, default=0.0,
                   help="fraction of the steps over which floor/wall/ceiling voxels are phased in (0: off)")
    g.add_argument("--bg-keep-max", type=float, default=1.0,
                   help="share of floor/wall/ceiling voxels kept at the end of --bg-curriculum (phased in from 0)")
    g.add_argument("--bg-hold", type=float, default=0.0,
                   help="keep --bg-keep-max (set it below 1) of the floor/wall/ceiling voxels after --bg-curriculum until "
                        "this share of the steps (cheaper steps; the rest see whole scenes)")
    g.add_argument("--templates", default=None,
                   help="train only on these question templates (comma-separated, e.g. color_of_class,exist)")
    g.add_argument("--template-curriculum", default=None,
                   help="cumulative template stages over --template-frac of the steps, e.g. "
                        "'exist,class_of_color;color_of_class;count' (stage j adds its templates; then all)")
    g.add_argument("--template-frac", type=float, default=0.5, help="fraction of the steps the template curriculum spans")
    g.add_argument("--relation-draws", type=int, default=4,
                   help="draws of the evaluation generator's relation questions per training scene (duplicates "
                        "dropped): 4 -> about 3 relation questions per scene, 12 -> about 6")


def _add_model_and_loss_args(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("stage 2: initialisation and losses")
    g.add_argument("--embed-std", type=float, default=0.3, help="init std of the text embeddings")
    g.add_argument("--rope-theta", type=float, default=10000.0, help="decoder RoPE base")
    g.add_argument("--pe-scale", type=float, default=1.0,
                   help="initialise the 3D position embedding's last layer this many times larger (the CLIP "
                        "features it is added to are ~10x the default embedding's norm)")
    g.add_argument("--dense-answer", type=float, default=0.0,
                   help="weight of the answer loss at every question position (deep supervision; 0: off)")
    g.add_argument("--dense-from", choices=DENSE_FROM, default="question",
                   help="where --dense-answer's targets start: 'question' = every question word after the "
                        "first; 'key-word' = from the last class/colour word, where the text first says what is "
                        "asked (relation questions name their second candidate last)")
    g.add_argument("--count-balance", action="store_true",
                   help="weight each counting question's loss by 1 / frequency of its answer over the training "
                        "scenes, so the answers 3 and 4 (rare in random rooms, as common as 0 in the test split) "
                        "stop losing to the prior")
    g.add_argument("--aux-weight", type=float, default=0.0,
                   help="weight of the auxiliary class/colour-word loss on scene tokens (alignment)")
    g.add_argument("--align-weight", type=float, default=0.0,
                   help="weight of the loss tying projected object tokens to their class/colour word embeddings")
    g.add_argument("--position-weight", type=float, default=0.0,
                   help="weight of a training-only loss that reads each scene token's voxel centre (metres from "
                        "the room's centre) linearly from the token as it enters the decoder (0: off)")
    for flag, (layer, help_text) in READ_OUT_FLAGS.items():
        g.add_argument(f"--{flag}-weight", type=float, default=0.0, help=help_text)
        g.add_argument(f"--{flag}-layer", type=int, default=layer,
                       help=f"decoder layer whose output --{flag}-weight reads (1..8)")


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m reference_model.train", description=__doc__.split("\n\n")[0])
    for add in (_add_run_args, _add_vision_args, _add_schedule_args, _add_model_and_loss_args):
        add(p)
    return p


def config_from_args(a: argparse.Namespace) -> TrainConfig:
    def read_out(flag: str) -> ReadOut:
        return ReadOut(getattr(a, f"{flag}_weight"), getattr(a, f"{flag}_layer"))

    stages = tuple(tuple(t for t in st.split(",") if t) for st in a.template_curriculum.split(";")) \
        if a.template_curriculum else None
    return TrainConfig(
        seed=a.seed, decoder_seed=a.decoder_seed, workers=a.workers,
        vision=VisionConfig(a.vision_scenes, a.vision_steps, a.vision_object_weight, a.vision_views, a.vision_cache),
        decoder=DecoderConfig(a.embed_std, a.rope_theta, a.pe_scale),
        data=DataConfig(a.scenes, a.relation_draws, tuple(a.templates.split(",")) if a.templates else None),
        schedule=ScheduleConfig(a.epochs, a.scenes_per_step, a.lr, a.lr_decay_frac, a.minutes, a.curriculum_views,
                                a.curriculum_frac, a.bg_curriculum, a.bg_keep_max, a.bg_hold, stages, a.template_frac),
        loss=LossConfig(a.dense_answer, a.dense_from, a.count_balance, a.aux_weight, a.align_weight, a.position_weight,
                        **{f.replace("-", "_"): read_out(f.replace("-", "_")) for f in READ_OUT_FLAGS}),
    )


def main(argv: list[str] | None = None) -> None:
    from reference_model.loop import record_eval, train

    a = parser().parse_args(argv)
    if a.threads:
        torch.set_num_threads(a.threads)
    if a.record_eval_only:
        record_eval(a.out)
        return
    try:
        train(a.out, config_from_args(a), command=command_line(sys.argv[1:] if argv is None else list(argv)))
    except InputError as e:
        print(f"error: {e}", file=sys.stderr)
        sys.exit(2)


if __name__ == "__main__":
    main()
