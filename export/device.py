"""Device-side steps of a bundle, torch-free so they run on the device itself: building TensorRT
engines into the bundle, and the bundle README with the exact device commands."""

from __future__ import annotations

import copy
import shutil
from pathlib import Path

from edge_tl import __version__
from edge_tl.errors import UserError
from edge_tl.fileio import temp_folder, unlink_links, write_text
from edge_tl.runtime import trt_support as ts
from edge_tl.runtime.bundle import GITATTRIBUTES, RELEASE_DIGEST, SELF_DIGEST, Bundle

from . import tensorrt as trt_build

ONNX_FILES = {"fp32": "model.fp32.onnx", "fp16": "model.fp16.onnx", "int8": "model.int8.onnx",
              "int8-cpu": "model.int8-cpu.onnx"}


def build_engines(bundle: Bundle, precisions: list[str], dla_core: int | None = None, workspace_mb: int = 1024,
                  gpu: int = 0, log=print) -> list[dict]:
    """Build TensorRT engines on this machine's CUDA device ``gpu`` from the bundle's ONNX files; record
    them in the manifest."""
    trt = ts.import_tensorrt()
    if (reason := ts.missing_reason()) is not None:
        raise UserError(reason)
    mode = trt_build.typing_mode(trt.__version__)
    info = ts.gpu_info(gpu)
    profile = trt_build.BatchProfile(**bundle.manifest["batch"])
    h, w = bundle.spec.input_size
    if (bundle.path / "engines").is_symlink():
        raise UserError(f"{bundle.path / 'engines'}: a symbolic link; engines are written into the bundle itself, never "
                        "through links. Replace it by a folder (remove the link; `edge-tl engine` makes the folder).")
    bundle.manifest[RELEASE_DIGEST] = bundle.release_id  # kept through the re-signing below
    built = []
    for precision in precisions:
        source = trt_build.SOURCE_ARTIFACT[mode][precision]
        try:
            src = bundle.artifact(source)
        except UserError:
            fix = ("it is a --target cpu bundle (ONNX Runtime's INT8 flavour); re-export with --target gpu or jetson"
                   if bundle.manifest.get("target") == "cpu" else f"re-export with --precision including {source}")
            raise UserError(f"{bundle.path}: a {precision} engine on TensorRT {trt.__version__} needs the '{source}' "
                            f"ONNX; {fix}.") from None
        rel = f"engines/{trt_build.engine_filename(precision, trt.__version__, info['gpu'], info['compute_capability'], dla_core)}"
        cache = bundle.path / "engines" / rel.split("/")[-1].replace(f"model.{precision}.", "timing.").replace(
            ".engine", ".cache")  # one timing cache per GPU and TensorRT version
        unlink_links(bundle.path / rel, cache)
        facts = trt_build.build_engine(bundle.file(src), bundle.path / rel, precision, bundle.manifest["input"]["name"],
                                       (3, h, w), profile, workspace_mb, dla_core, cache, gpu, log)
        name = f"trt-{precision}" + (f"-dla{dla_core}" if dla_core is not None else "") + f"@{ts.slug(info['gpu'])}"
        art = {"name": name, "file": rel,
               "format": "engine", "precision": precision, "backend": "tensorrt", "source": src["file"],
               "float_nodes": src.get("float_nodes", []), "accepted": src.get("accepted", True),
               **({"rejected": src["rejected"]} if "rejected" in src else {}),
               "fp32_agreement": src.get("fp32_agreement"), **facts}  # check's golden gate allows for it
        art["val_accuracy"] = None  # measured by `edge-tl check` on the device
        # one engine per name: one built by an earlier TensorRT (another file) cannot run on this one
        stale = [a["file"] for a in bundle.artifacts if a["name"] == name and a["file"] != rel]
        bundle.manifest["artifacts"] = [a for a in bundle.artifacts if a["file"] != rel and a["name"] != name] + [art]
        bundle.manifest["files"] = {k: v for k, v in bundle.manifest["files"].items() if k not in stale}
        bundle.add_file(rel)
        bundle.save()  # at once: the engine file on disk and its recorded sha256 never disagree
        for old in stale:
            (bundle.path / old).unlink(missing_ok=True)
            log(f"replaced {old} (built by another TensorRT version)")
        built.append(art)
        log(f"engine {rel} ({facts['gpu']}, sm {facts['compute_capability']}, TensorRT {facts['tensorrt']})")
    bundle.manifest["versions"]["tensorrt"] = trt.__version__
    bundle.save()
    return built


def slim_bundle(path: str | Path, keep: list[str], out: str | Path, log=print) -> Bundle:
    """Copy the bundle to ``out`` with only the ``keep`` artifacts (names), manifest re-signed.

    For a device with little storage: the copy is a complete bundle (labels, golden outputs and
    test vectors stay, every file still verified), not a partial one that loads half-checked.
    """
    bundle = Bundle.load(path)
    names = [a["name"] for a in bundle.artifacts]
    if not keep or (unknown := [k for k in keep if k not in names]):
        raise UserError(f"--keep {','.join(keep) or '(nothing)'}: name artifacts of {bundle.path} ({', '.join(names)}).")
    out = Path(out)
    if out.exists():
        raise UserError(f"{out}: already exists; choose a new folder for the slimmed bundle.")
    dropped = [a for a in bundle.artifacts if a["name"] not in keep]
    gone = {a["file"] for a in dropped}
    tmp = temp_folder(out)
    try:
        write_text(tmp / ".gitattributes", GITATTRIBUTES)  # written, not copied: no file the manifest leaves unhashed
        for rel in bundle.manifest["files"]:
            if rel not in gone and rel != ".gitattributes" and (bundle.path / rel).is_file():
                (tmp / rel).parent.mkdir(parents=True, exist_ok=True)
                shutil.copy2(bundle.path / rel, tmp / rel)  # verified against its hash below
        slim = Bundle(tmp, copy.deepcopy(bundle.manifest))
        slim.manifest["artifacts"] = [a for a in bundle.artifacts if a["name"] in keep]
        slim.manifest["files"] = {k: v for k, v in bundle.manifest["files"].items()
                                  if k not in gone and k != ".gitattributes"}  # written anew, not hashed
        slim.manifest[RELEASE_DIGEST] = bundle.release_id
        slim.manifest["slimmed"] = {"from": str(bundle.path.resolve()), "dropped": [a["name"] for a in dropped],
                                    "from_manifest_sha256": bundle.manifest.get(SELF_DIGEST)}
        slim.save()
        write_text(tmp / "README.md", bundle_readme(slim, out))
        Bundle.load(tmp)  # verified before it takes the name
        if not any(a.get("accepted", True) and a.get("default", True) for a in slim.artifacts):
            log(f"warning: export chose none of {', '.join(keep)} as a default ("
                + "; ".join(f"{a['name']}: {a.get('not_default') or a.get('rejected') or 'not accepted'}" for a in slim.artifacts)
                + "): apps run it with a warning; keep fp32 too, or name the artifact in the app")
        try:
            tmp.rename(out)
        except OSError:
            if out.exists():  # another slim to the same --out finished first
                raise UserError(f"{out}: was created meanwhile (another slim?); choose a new folder.") from None
            raise
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    kept_mb = sum((out / a["file"]).stat().st_size for a in slim.artifacts) / 1e6
    log(f"{out}: {', '.join(keep)} ({kept_mb:.1f} MB of models); dropped {', '.join(a['name'] for a in dropped) or 'nothing'}")
    return Bundle.load(out)


def source_checkout() -> Path | None:
    """The edge-tl source folder this package runs from (an editable or source install), else None."""
    root = Path(__file__).resolve().parents[1]
    return root if (root / "pyproject.toml").is_file() and (root / "runtime").is_dir() else None


def device_commands(bundle: Bundle, where: str | Path) -> list[tuple[str, str]]:
    """(what, command) steps to finish a bundle on its device, TensorRT engine included."""
    b = str(where)
    precisions = [a["precision"] for a in bundle.artifacts
                  if a["format"] == "onnx" and a["precision"] != "fp32" and a["backend"] == "tensorrt"] or ["fp32"]
    prec = ",".join(dict.fromkeys(precisions))
    h, w = bundle.spec.input_size
    profile = trt_build.BatchProfile(**bundle.manifest["batch"])
    # edge-tl is not on PyPI: the device installs a wheel, made here from this checkout, else the one
    # this machine was installed from (its name is fixed by the version)
    checkout, pkg = source_checkout(), f"~/edge_tl-{__version__}-py3-none-any.whl"
    steps = [("copy the bundle and the edge-tl wheel this machine was installed from to the device",
              f"rsync -a {b} edge_tl-{__version__}-py3-none-any.whl DEVICE:~/")]
    if checkout is not None:
        wheels = Path(b).parent / f"{Path(b).name}-wheel"
        steps = [("make a wheel of this edge-tl (not on PyPI) to install on the device",
                  f"rm -rf {wheels} && pip wheel --no-deps -w {wheels} {checkout}"),
                 ("copy the bundle and the wheel to the device", f"rsync -a {b} {wheels} DEVICE:~/")]
        pkg = f"~/{wheels.name}/edge_tl-*.whl"
    if bundle.manifest["target"] == "cpu":
        steps.append(("install the runtime in its own environment (Raspberry Pi OS, Debian 12 and Ubuntu 23.04+ "
                      "refuse pip into the system Python; PyPI has onnxruntime for x86-64 and aarch64, glibc >= 2.28)",
                      f"python3 -m venv ~/edge-tl && . ~/edge-tl/bin/activate && pip install {pkg} onnxruntime"))
        steps.append(("or, on an x86 CPU with VNNI, in an environment of its own: ONNX Runtime's OpenVINO provider "
                      "(INT8 1.15-1.4x faster here; add --device openvino below)",
                      f"python3 -m venv ~/edge-tl-ov && . ~/edge-tl-ov/bin/activate && pip install --no-deps {pkg} && "
                      "pip install numpy pillow typer onnxruntime-openvino"))
        names = set()
    else:
        steps += [
            ("install the runtime (JetPack: keep the system TensorRT, in an environment made with python3 -m venv "
             "--system-site-packages; cuda-python must match JetPack's CUDA major version: this line is for "
             "JetPack 6, CUDA 12; on JetPack 7, CUDA 13, use 'cuda-python>=13')",
             f"pip install {pkg} 'cuda-python>=12.6,<13' onnxruntime")
            if bundle.manifest["target"] == "jetson" else
            ("install the runtime with TensorRT (PyPI's tensorrt and cuda-python are CUDA 13 builds for driver "
             "r580 or newer; with an older driver: tensorrt-cu12 'cuda-python>=12.6,<13')",
             f"pip install {pkg} tensorrt cuda-python onnxruntime"),
            ("build the engines on the device (engines are tied to GPU and TensorRT version)",
             f"edge-tl engine {Path(b).name} --precision {prec}"),
        ]
        names = {a["name"] for a in bundle.artifacts}
    for p in dict.fromkeys(precisions):
        for mode, tag in (("weak", "TensorRT 10"), ("strong", "TensorRT 11")):
            source = trt_build.SOURCE_ARTIFACT[mode][p]
            if source not in names:
                continue
            cmd = trt_build.trtexec_command(f"{Path(b).name}/{ONNX_FILES[source]}", f"{Path(b).name}/model.{p}.engine",
                                            p, bundle.manifest["input"]["name"], (3, h, w), profile, mode)
            steps.append((f"or with trtexec, {p}, {tag} (the manifest does not record its engine, so check and "
                          "bench below see only what `edge-tl engine` built; load it with the TensorRT API yourself)",
                          trt_build.format_command(cmd)))
    steps += [("check accuracy against the golden outputs and the manifest", f"edge-tl check {Path(b).name}"),
              ("measure latency", f"edge-tl bench {Path(b).name} --batch 1,8")]
    return steps


def _fmt(value: float | None) -> str:
    return "on device: edge-tl check" if value is None else f"{value:.4f}"


def bundle_readme(bundle: Bundle, where: str | Path) -> str:
    m = bundle.manifest
    rows = "\n".join(f"| {a['name']} | `{a['file']}` | {a['precision']} | {a['backend']} | "
                     f"{_fmt(a.get('val_accuracy'))} | {len(a.get('float_nodes', []))} |" for a in m["artifacts"])
    steps = "\n".join(f"# {what}\n{cmd}\n" for what, cmd in device_commands(bundle, where))
    p = m["preprocess"]
    port = ("\nAn app that preprocesses itself follows `preprocess.steps` in the manifest (the crop offset rounds\n"
            "half to even) and tests itself on `golden.npz`: `source_<i>` images → `source_pixels`"
            + (", the camera-sized JPEG `jpeg_source` → `jpeg_pixels`." if bundle.jpeg_vector() else ".")
            if "steps" in p else "")  # bundles exported before they existed
    jpeg = (f"\nA JPEG at least {p['jpeg_reducing_gap'] * 2:g}× {p['resize_size']} px on its shorter side (a camera's photo) is first decoded at\n"
            "1/2, 1/4 or 1/8 scale by libjpeg's DCT scaling, as in training (`preprocess.steps.decode`)."
            if p.get("jpeg_reducing_gap") else "")
    fit = m.get("scores") or {"skipped": "a bundle from before the fit"}
    scores = ("scores are their plain softmax (temperature 1: " + fit["skipped"] + ")" if "skipped" in fit else
              f"scores are softmax(logits / {fit['temperature']}), the temperature fitted on the validation split")
    return f"""# edge-tl bundle: {m['model']} ({len(m['classes'])} classes), target {m['target']}

`manifest.json` is the contract: classes, preprocessing, input/output, artifacts, the sha256 of every
file, accuracy on the validation split, INT8 calibration, score temperature and versions. `edge-tl` refuses to run a file
whose sha256 differs from it.

Input `{m['input']['name']}`: float32 N×3×{p['input_size'][0]}×{p['input_size'][1]} RGB pixels 0–255, after resizing the
shorter side to {p['resize_size']} ({p['interpolation']}) and a center crop. Mean/std are inside the graph.
The resize is Pillow's `Image.resize` (its {p['interpolation']} filter widens with the scale factor, i.e. it
antialiases when shrinking): OpenCV's `INTER_CUBIC` or torch without `antialias=True` give other pixels,
enough to flip some predictions; `edge_tl.runtime.Predictor.preprocess` does it exactly.{jpeg}{port}
Output `{m['output']['name']}`: N×{len(m['classes'])} logits in the order of `labels.txt` (the class folders' names
sorted as text: a folder "10" comes before "2"; map an index to its class through labels.txt); {scores}.

| artifact | file | precision | made for | val accuracy | layers kept in float |
|---|---|---|---|---|---|
{rows}

## Use it

```python
from edge_tl.runtime import Predictor
with Predictor.from_bundle("{Path(where).name}") as p:
    print(p.predict("image.jpg"))
```

In the field, `edge-tl drift {Path(where).name} DIR` (or `Predictor.monitor()` in an app) compares images
without labels with this bundle's validation images: predicted-class mix, share of low scores, brightness, contrast.

## On the device

```sh
{steps}```
"""
