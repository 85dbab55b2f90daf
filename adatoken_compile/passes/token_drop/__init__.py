"""Token drop: the tensor math (:mod:`.ops`), the inserted graph steps (:mod:`.steps`) and the FX
pass that inserts them (:mod:`.rewrite`)."""

from adatoken_compile.passes.token_drop.ops import (gather_seq, keep_counts, keep_millionths, kept_positions,
                                                    last_token_scores, random_scores, rebuild_mask4d, score_for,
                                                    select_tokens, spatial_count)
from adatoken_compile.passes.token_drop.rewrite import (TokenDropError, apply_token_drop, compile_pruned, layer_of,
                                                        token_drop_backend)

__all__ = ["TokenDropError", "apply_token_drop", "compile_pruned", "gather_seq", "keep_counts", "keep_millionths",
           "kept_positions", "last_token_scores", "layer_of", "random_scores", "rebuild_mask4d", "score_for",
           "select_tokens", "spatial_count", "token_drop_backend"]
