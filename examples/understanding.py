"""Ask a question about an image with G2TR on, and see what the reduction saved.

    python examples/understanding.py                                   # tiny random BAGEL, synthetic image
    python examples/understanding.py --model bagel-g2tr --image photo.jpg --question "What is on the table?"

`--model` is a folder written by `g2tr-hf convert` / `g2tr-hf export` (or a Hub repo made from one), BAGEL or
InternVL-U. Without it the tiny random BAGEL is built on the fly, so the answer is meaningless.
"""

import argparse

from PIL import Image
from transformers import AutoModelForImageTextToText, AutoProcessor, pipeline

from g2tr_hf import build_tiny
from g2tr_hf.demo import synthetic_scene
from g2tr_hf.profiling import profile_request


parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
parser.add_argument("--model")
parser.add_argument("--image")
parser.add_argument("--question", default="Describe this image.")
parser.add_argument("--ratio", type=float, default=0.5)
args = parser.parse_args()

if args.model:
    model = AutoModelForImageTextToText.from_pretrained(args.model, trust_remote_code=True, g2tr_ratio=args.ratio)
    processor = AutoProcessor.from_pretrained(args.model, trust_remote_code=True)
else:
    model, processor = build_tiny("bagel")
    model.config.g2tr_ratio = args.ratio
image = Image.open(args.image).convert("RGB") if args.image else synthetic_scene(256)
messages = [{"role": "user", "content": [{"type": "image", "image": image}, {"type": "text", "text": args.question}]}]

# The stock pipeline: the model drops the merged tokens' slots itself, whatever the ratio.
pipe = pipeline("image-text-to-text", model=model, processor=processor)
answer = pipe(text=messages, generate_kwargs={"max_new_tokens": 32, "do_sample": False})
print("answer:", answer[0]["generated_text"][-1]["content"])

inputs = processor.apply_chat_template(
    messages, add_generation_prompt=True, tokenize=True, return_dict=True, return_tensors="pt"
)
accounting = profile_request(model, inputs, repeats=1).accounting
print(f"ViT tokens {sum(accounting.image_tokens)} -> {sum(accounting.kept_tokens)}; "
      f"KV entries {accounting.kv_entries[0]} -> {accounting.kv_entries[1]} ({accounting.kv_ratio:.2f}x); "
      f"LLM prefill FLOPs {accounting.flops_ratio:.2f}x lower")
