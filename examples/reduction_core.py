"""The reduction core on its own: score, select and merge one image's tokens, then draw the keep set.

    python examples/reduction_core.py -o kept.png
"""

import argparse

import torch

from g2tr_hf import build_latent_anchors, reduce_tokens
from g2tr_hf.demo import synthetic_scene
from g2tr_hf.visualization import draw_kept_tokens


parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
parser.add_argument("--ratio", type=float, default=0.5)
parser.add_argument("--method", default="g2tr", help="g2tr, topk, random or pool")
parser.add_argument("-o", "--output", default="kept.png")
args = parser.parse_args()

torch.manual_seed(0)
features = torch.randn(70 * 70, 256)  # BAGEL: connector outputs of a 70x70 ViT grid
latents = torch.randn(16, 128, 128)  # the same image's VAE latent, [C, H, W]
vae2llm = torch.nn.Linear(64, 256)  # BAGEL's latent -> LLM map (random here)
with torch.no_grad():
    anchors, anchor_grid = build_latent_anchors(latents, patch_size=2, pool=2, project=vae2llm)
    result = reduce_tokens(features, (70, 70), anchors, anchor_grid, ratio=args.ratio, method=args.method)

print(f"{result.num_tokens} tokens -> {result.num_kept} kept; merged tokens {tuple(result.tokens.shape)}")
print(f"largest group: {int(torch.bincount(result.assignment).max())} tokens merged into one")
draw_kept_tokens(synthetic_scene(), (70, 70), result.keep).save(args.output)
print(f"wrote {args.output}")
