"""Write a Hub-ready folder (remote code + auto_map + card) and, with --repo-id, upload it.

    python examples/export_to_hub.py tiny-bagel-g2tr                       # the tiny random BAGEL
    python examples/export_to_hub.py bagel-hub --model bagel-g2tr --repo-id you/BAGEL-7B-MoT-G2TR

The folder loads with `AutoModelForImageTextToText.from_pretrained(folder, trust_remote_code=True)` on a machine
without g2tr-hf.
"""

import argparse

from transformers import AutoModelForImageTextToText, AutoProcessor

from g2tr_hf import build_tiny
from g2tr_hf.hub import export, push_folder


parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
parser.add_argument("destination")
parser.add_argument("--model")
parser.add_argument("--repo-id", help="upload to this Hub repo (needs a token with write access)")
args = parser.parse_args()

if args.model:
    model = AutoModelForImageTextToText.from_pretrained(args.model, trust_remote_code=True)
    processor = AutoProcessor.from_pretrained(args.model, trust_remote_code=True)
else:
    model, processor = build_tiny("bagel")
# Safetensors shards of at most 5 GB; the model card's snippets load --repo-id when given.
folder = export(model, processor, args.destination, repo_id=args.repo_id, overwrite=True)
print("wrote", sorted(path.name for path in folder.iterdir()))
if args.repo_id:
    # One commit that also deletes weight files of an earlier upload; folders over 10 GB use the resumable
    # large-folder upload (run the script again after an interruption).
    print(push_folder(folder, args.repo_id))
