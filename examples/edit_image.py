"""Edit an image with BAGEL and G2TR (the input image's ViT tokens are reduced; its VAE tokens are not).

    python examples/edit_image.py                                      # tiny random BAGEL: the output is noise
    python examples/edit_image.py --model bagel-g2tr --image in.png --prompt "Make it winter." -o out.png
"""

import argparse

import torch
from PIL import Image

from g2tr_hf import G2TRBagelPipeline, build_tiny
from g2tr_hf.demo import synthetic_scene


parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
parser.add_argument("--model")
parser.add_argument("--image")
parser.add_argument("--prompt", default="Make the sky red.")
parser.add_argument("--ratio", type=float, default=0.5)
parser.add_argument("--steps", type=int, default=50)
parser.add_argument("-o", "--output", default="edited.png")
args = parser.parse_args()

if args.model:
    from transformers import pipeline

    # The converted / exported folder ships the pipeline as remote code next to the model.
    pipe = pipeline(model=args.model, trust_remote_code=True)
else:
    model, processor = build_tiny("bagel")
    pipe = G2TRBagelPipeline(model=model, processor=processor)
image = Image.open(args.image).convert("RGB") if args.image else synthetic_scene(64)
result = pipe(
    prompt=args.prompt,
    image=image,
    num_inference_steps=args.steps,
    g2tr_ratio=args.ratio,
    generator=torch.Generator().manual_seed(0),
)
result.images[0].save(args.output)
print(f"wrote {args.output} ({result.images[0].size[0]}x{result.images[0].size[1]})")
