"""DVC stage `augment`: the Albumentations policy file train loads, and a preview grid."""

from common import load_params, run_stage


def main(prepared: str, policy_path: str, preview_path: str) -> None:
    params = load_params()
    # the library is imported once the params are read (common.py)
    from pipeline.data.augment import load_policy, policy, save_policy
    from pipeline.data.prepared import PreparedData
    from pipeline.plots import augmentation_preview

    images = PreparedData(prepared).split("train").images
    save_policy(params.augment, images.shape[1], policy_path)
    transform = load_policy(policy(params.augment, images.shape[1]), seed=0)
    augmentation_preview(transform, images[: min(4, len(images))], preview_path)
    print(f"policy: {policy_path} ({len(transform.transforms)} transforms); preview: {preview_path}")


if __name__ == "__main__":
    run_stage(main, __doc__)
