"""DVC stage `augment`: the Albumentations policy file train loads, and a preview grid."""

import sys

from common import load_params

from pipeline.augment import load_policy, policy, preview, save_policy
from pipeline.prepare import load_split


def main(prepared: str, policy_path: str, preview_path: str) -> None:
    params = load_params()
    images, _, _ = load_split(prepared, "train")
    save_policy(params.augment, images.shape[1], policy_path)
    transform = load_policy(policy(params.augment, images.shape[1]), seed=0)
    preview(transform, images[: min(4, len(images))], preview_path)
    print(f"policy: {policy_path} ({len(transform.transforms)} transforms); preview: {preview_path}")


if __name__ == "__main__":
    main(*sys.argv[1:])
