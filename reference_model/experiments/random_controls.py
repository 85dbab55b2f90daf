"""Random control at the peers' token counts (pdrop, adatoken-decay) on the first 500 test questions,
through the PyTorch reference.

    OMP_NUM_THREADS=2 python -m reference_model.experiments.random_controls
"""
from adatoken_compile.benchmark3d.dataset import iter_samples
from adatoken_compile.evaluation.accuracy import evaluate
from adatoken_compile.evaluation.answers import reference_answer_fn as pruned_answer_fn
from adatoken_compile.models.registry import DEFAULT_MODEL, load_adapter
from adatoken_compile.calibration.policies import peer_schedule
ad = load_adapter(DEFAULT_MODEL)
L = ad.describe()["layers"]
qs = list(iter_samples("test", limit=500))
for peer in ["pdrop", "adatoken-decay"]:
    like = peer_schedule(peer, L, fingerprint=ad.fingerprint())
    rnd = peer_schedule("random", L, like=like, fingerprint=ad.fingerprint())
    res = evaluate(pruned_answer_fn(ad, rnd), qs)
    print(peer, "random at its counts:", res["accuracy"], {k: round(v["accuracy"], 3) for k, v in res["per_kind"].items()}, flush=True)
