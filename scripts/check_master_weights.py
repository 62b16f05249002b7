"""What `load_weights` reads from a checkpoint tag (bert-export, --init-from) against DeepSpeed's zero_to_fp32 and
against the checkpoint's 16-bit module weights: the first must match exactly, the second shows what reading the
module copy of a bf16/fp16 run would lose.

    python scripts/check_master_weights.py RUN_DIR/step_00000030
"""

import sys
from pathlib import Path

import torch

from pretrain.runtime.resume import partitioned
from pretrain.runtime.weights import load_weights


def main(tag_dir: Path) -> None:
    _, ours = load_weights(tag_dir)
    module = torch.load(tag_dir / "mp_rank_00_model_states.pt", map_location="cpu", weights_only=False)["module"]
    print(f"module weights: {sorted({str(v.dtype) for v in module.values()})}")
    if partitioned(tag_dir):
        from deepspeed.utils.zero_to_fp32 import get_fp32_state_dict_from_zero_checkpoint

        ref = get_fp32_state_dict_from_zero_checkpoint(str(tag_dir.parent), tag=tag_dir.name)
        diff = max((ours[k] - ref[k].float()).abs().max().item() for k in ref)
        print(f"load_weights vs zero_to_fp32: max abs difference {diff}")
    d = {k: (ours[k] - module[k].float()).abs().max().item() for k in module}
    worst = max(d, key=d.get)
    print(
        f"load_weights vs the module weights: max abs difference {d[worst]:.3g} ({worst}); "
        f"{sum(v > 0 for v in d.values())} of {len(d)} tensors differ"
    )


if __name__ == "__main__":
    main(Path(sys.argv[1]))
