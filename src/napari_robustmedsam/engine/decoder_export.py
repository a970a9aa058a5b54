"""Export a plain model's prompt encoder and mask decoder to ONNX, for decoding cached embeddings without torch.

How it is used: ``robustmedsam segment`` calls :func:`export_for_cache` after it has written its masks, once per model
and prompt set-up; :mod:`napari_robustmedsam.engine.exported_decoder` says what the export is for and when a later
call uses it. The export goes through torch's TorchScript-based ONNX exporter (a trace; about a second on a CPU).

What is exported is segment_anything's ``PromptEncoder`` and ``MaskDecoder`` as they are, for one prompt set-up,
with the number of objects and of points free. Before it is recorded, the graph is run with ONNX Runtime on a
different number of objects and points than it was traced with, and compared with the torch modules: a graph that
does not match is not recorded (later calls keep decoding with torch).
"""

from __future__ import annotations

import warnings
from pathlib import Path

import numpy as np
import torch
from torch import nn

from . import exported_decoder as exported
from ..io.atomic import atomic_write_path

#: Largest difference allowed between the exported graph's logits and torch's on the check inputs; float32
#: rounding differs by about 1e-5, a graph that froze a shape differs by whole units.
CHECK_TOLERANCE = 1e-3


class ExportError(RuntimeError):
    """The decoder could not be exported, or the exported graph does not match the torch modules."""


def exportable(model: nn.Module) -> bool:
    """Whether a model's decoding is segment_anything's prompt encoder and mask decoder alone (no robust or
    prompt-guided head, no empty-mask fallback), which is what an exported graph reproduces."""
    from segment_anything.modeling import MaskDecoder, PromptEncoder

    return (
        type(getattr(model, "mask_decoder", None)) is MaskDecoder
        and type(getattr(model, "prompt_encoder", None)) is PromptEncoder
        and not getattr(model, "is_robust", False)
        and getattr(model, "feature_enhancer", None) is None
        and getattr(model, "empty_mask_fallback", None) is None
    )


class _PromptDecoder(nn.Module):
    """prompts -> (low-resolution logits, predicted IoU) for one prompt set-up, as the predictor decodes them.

    :meth:`forward` is what is exported: segment_anything's prompt encoder with its point labels applied by
    arithmetic instead of boolean-mask assignment (which a trace freezes to the traced shape), as segment_anything's
    own ONNX model does; the sums are the same, in the same order. :meth:`reference` calls the modules themselves;
    :func:`export_graph` checks the graph against it.
    """

    def __init__(self, model: nn.Module, setup: str) -> None:
        super().__init__()
        self.prompt_encoder = model.prompt_encoder
        self.mask_decoder = model.mask_decoder
        self.register_buffer("image_pe", model.prompt_encoder.get_dense_pe().detach().clone())
        self.with_points = setup != "box"
        self.with_box = setup.endswith("box")
        self.multimask = setup == "point-multimask"

    def _prompts(self, prompts) -> tuple:
        prompts = list(prompts)
        points = (prompts.pop(0), prompts.pop(0)) if self.with_points else None
        boxes = prompts.pop(0) if self.with_box else None
        return points, boxes

    def _embed_points(self, coords: torch.Tensor, labels: torch.Tensor, pad: bool) -> torch.Tensor:
        pe = self.prompt_encoder
        coords = coords + 0.5  # the centre of the pixel, as PromptEncoder._embed_points
        labels = labels.to(coords.dtype)
        if pad:  # a "not a point" after the points when there is no box
            coords = torch.cat([coords, torch.zeros_like(coords[:, :1])], dim=1)
            labels = torch.cat([labels, -torch.ones_like(labels[:, :1])], dim=1)
        embedding = pe.pe_layer.forward_with_coords(coords, pe.input_image_size)
        labels = labels[..., None]
        embedding = embedding * (labels != -1).to(embedding.dtype)
        embedding = embedding + pe.not_a_point_embed.weight * (labels == -1).to(embedding.dtype)
        embedding = embedding + pe.point_embeddings[0].weight * (labels == 0).to(embedding.dtype)
        return embedding + pe.point_embeddings[1].weight * (labels == 1).to(embedding.dtype)

    def _decode(self, image_embeddings, sparse, dense):
        return self.mask_decoder(image_embeddings=image_embeddings, image_pe=self.image_pe,
                                 sparse_prompt_embeddings=sparse, dense_prompt_embeddings=dense,
                                 multimask_output=self.multimask)

    def forward(self, image_embeddings, *prompts):
        pe = self.prompt_encoder
        points, boxes = self._prompts(prompts)
        parts = []
        if points is not None:
            parts.append(self._embed_points(points[0], points[1], pad=boxes is None))
        if boxes is not None:
            parts.append(pe._embed_boxes(boxes))
        sparse = torch.cat(parts, dim=1) if len(parts) > 1 else parts[0]
        grid = pe.image_embedding_size
        dense = pe.no_mask_embed.weight.reshape(1, -1, 1, 1).expand(sparse.shape[0], -1, grid[0], grid[1])
        return self._decode(image_embeddings, sparse, dense)

    def reference(self, image_embeddings, *prompts):
        points, boxes = self._prompts(prompts)
        sparse, dense = self.prompt_encoder(points=points, boxes=boxes, masks=None)
        return self._decode(image_embeddings, sparse, dense)


def _example(setup: str, n: int, p: int, size: int, generator: torch.Generator) -> tuple[list[str], list[torch.Tensor]]:
    names, tensors = [], []
    if setup != "box":
        names += [exported.INPUT_POINTS, exported.INPUT_LABELS]
        tensors += [torch.rand(n, p, 2, generator=generator) * size, (torch.arange(n * p).reshape(n, p) % 2)]
    if setup.endswith("box"):
        corner = torch.rand(n, 2, generator=generator) * size / 2
        tensors.append(torch.cat([corner, corner + size / 4], dim=1))
        names.append(exported.INPUT_BOXES)
    return names, tensors


def export_graph(model: nn.Module, setup: str, path: str | Path, image_size: int) -> None:
    """Write the ONNX graph of ``setup`` for ``model`` (CPU, float32) to ``path`` atomically, after checking it."""
    import onnxruntime as ort

    wrapper = _PromptDecoder(model, setup).eval()
    generator = torch.Generator().manual_seed(0)
    grid = tuple(int(v) for v in model.prompt_encoder.image_embedding_size)
    embeddings = torch.randn(1, model.prompt_encoder.embed_dim, *grid, generator=generator)
    single = setup == "point-multimask"
    names, trace_inputs = _example(setup, 2, 1 if single else 3, image_size, generator)
    dynamic = {name: ({0: "objects", 1: "points"} if name != exported.INPUT_BOXES else {0: "objects"}) for name in names}
    if single:  # one point, by definition
        dynamic = {name: {0: "objects"} for name in names}
    path = Path(path)
    with atomic_write_path(path) as tmp, warnings.catch_warnings(), torch.no_grad():
        # the TorchScript exporter's deprecation notice and the tracer's notes on constants are about this
        # trace, which the check below verifies; they are not for the user
        warnings.simplefilter("ignore")
        torch.onnx.export(wrapper, (embeddings, *trace_inputs), str(tmp), dynamo=False,
                          input_names=[exported.INPUT_EMBEDDINGS, *names], output_names=list(exported.OUTPUT_NAMES),
                          dynamic_axes=dynamic, opset_version=17)
        _, check_inputs = _example(setup, 3, 1 if single else 2, image_size, generator)
        want = wrapper.reference(embeddings, *check_inputs)
        options = ort.SessionOptions()
        options.log_severity_level = 4  # a failure is raised; ONNX Runtime's own log is not for the user
        session = ort.InferenceSession(str(tmp), options, providers=["CPUExecutionProvider"])
        feeds = {exported.INPUT_EMBEDDINGS: embeddings.numpy()}
        feeds.update({name: t.numpy() for name, t in zip(names, check_inputs)})
        try:
            got = session.run(list(exported.OUTPUT_NAMES), feeds)
        except Exception as err:  # noqa: BLE001 - e.g. a shape the trace froze
            raise ExportError(f"the exported {setup} decoder fails on other prompt counts ({err})") from err
        for mine, theirs in zip(got, want):
            if mine.shape != tuple(theirs.shape) or not np.allclose(mine, theirs.numpy(), atol=CHECK_TOLERANCE, rtol=0):
                raise ExportError(f"the exported {setup} decoder does not reproduce the model's output")


def qualifies(loaded) -> bool:
    """Whether :func:`export_for_cache` can export ``loaded``'s decoder: a plain decoder (:func:`exportable`) from a
    checkpoint file, on the CPU in float32, with ONNX Runtime installed to run it."""
    return (loaded.checkpoint_path is not None and exportable(loaded.model) and loaded.device.type == "cpu"
            and loaded.dtype == torch.float32 and exported.onnxruntime_available())


def export_for_cache(loaded, signature_json: dict, setup: str, cache_dir: str | Path, key: str,
                     record: exported.DecoderRecord | None = None) -> None:
    """Export ``setup``'s graph of ``loaded`` (a :class:`~napari_robustmedsam.checkpoints.loading.LoadedModel` that
    :func:`qualifies`) into ``cache_dir``'s decoders and add it to the record ``key`` (``record``: that record as
    the caller read it, if it exists; it is started again when the checkpoint or the signature differ)."""
    model = loaded.model
    stamp = exported.file_stamp(loaded.checkpoint_path)
    template = exported.signature_template(signature_json)
    if record is None or record.checkpoint != stamp or record.signature != template:
        record = exported.DecoderRecord(key=key, model_name=loaded.name, box_primary=bool(loaded.box_primary),
                                        preprocessing=loaded.preprocessing, checkpoint=stamp, signature=template,
                                        graphs={})
    name = f"{key}-{setup.replace('+', '-')}.onnx"
    path = exported.decoders_dir(cache_dir) / name
    path.parent.mkdir(parents=True, exist_ok=True)
    export_graph(model, setup, path, int(model.architecture.image_size))
    record.graphs[setup] = {"file": name, "sha256": exported.file_checksum(path)}
    exported.write_record(cache_dir, record)
