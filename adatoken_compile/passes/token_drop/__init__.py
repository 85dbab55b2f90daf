"""Token drop: the tensor math (:mod:`.ops`), the selection rules (:mod:`.rules`), the inserted graph
steps (:mod:`.steps`) and the FX pass that inserts them (:mod:`.rewrite`)."""

from adatoken_compile.passes.token_drop.ops import (gather_seq, keep_counts, keep_millionths, kept_positions,
                                                    last_token_scores, random_scores, rebuild_mask4d, score_cut,
                                                    select_tokens, spatial_count, spatial_rank)
from adatoken_compile.passes.token_drop.rewrite import (TokenDropError, apply_token_drop, compile_pruned, layer_of,
                                                        token_drop_backend)

__all__ = ["TokenDropError", "apply_token_drop", "compile_pruned", "gather_seq", "keep_counts", "keep_millionths",
           "kept_positions", "last_token_scores", "layer_of", "random_scores", "rebuild_mask4d", "score_cut",
           "select_tokens", "spatial_count", "spatial_rank", "token_drop_backend"]
