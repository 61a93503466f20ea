"""ImageFolder discovery, the validation split, skipped files and the bad-input errors."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest
from PIL import Image

from edge_tl.errors import UserError
from edge_tl.finetune.config import check_out_beside_data
from edge_tl.finetune.data import discover, keep_copies_together, read_images_table, stratified_split
from edge_tl.runtime.spec import PreprocessSpec

from conftest import make_image_folder

SPEC = PreprocessSpec(input_size=(32, 32), crop_pct=1.0)


def test_flat_layout_carves_stratified_val(tiny_folder):
    data = discover(tiny_folder, SPEC, val_fraction=0.25, progress=False)
    assert data.classes == ["checker", "hstripes", "vstripes"]
    assert data.train.counts(3) == [6, 6, 6] and data.val.counts(3) == [2, 2, 2]
    assert not set(data.train.paths) & set(data.val.paths)
    assert data.train.arrays[0].shape[:2] == (32, 32)  # decoded once, resized to the spec


def test_train_val_test_layout_never_reads_test(tmp_path):
    make_image_folder(tmp_path / "d" / "train", per_class=4)
    make_image_folder(tmp_path / "d" / "val", per_class=2, seed=1)
    make_image_folder(tmp_path / "d" / "test", per_class=2, seed=2, classes=("zzz",))
    data = discover(tmp_path / "d", SPEC, progress=False)
    assert data.val_source == "val/ folder"
    assert len(data.train) == 12 and len(data.val) == 6 and "zzz" not in data.classes
    assert all("test" not in p.parts for p in data.train.paths + data.val.paths)


def test_split_folders_in_any_letter_case_are_splits_not_classes(tmp_path):
    """Train/, Validation/ and Test/ (Windows, dataset exports) split the data as their lower-case names do."""
    make_image_folder(tmp_path / "d" / "Train", per_class=4)
    make_image_folder(tmp_path / "d" / "Validation", per_class=2, seed=1)
    make_image_folder(tmp_path / "d" / "Test", per_class=2, seed=2, classes=("zzz",))
    data = discover(tmp_path / "d", SPEC, progress=False)
    assert data.classes == ["checker", "hstripes", "vstripes"] and data.val_source == "Validation/ folder"
    assert len(data.train) == 12 and len(data.val) == 6
    make_image_folder(tmp_path / "d" / "train", per_class=1)
    with pytest.raises(UserError, match="Train/ and train/ differ only in letter case; merge them into one train/"):
        discover(tmp_path / "d", SPEC, progress=False)
    flat = make_image_folder(tmp_path / "flat", per_class=2)
    make_image_folder(flat / "Test", per_class=2, seed=2)
    with pytest.raises(UserError, match="a 'Test' folder beside the class folders"):
        discover(flat, SPEC, progress=False)
    gtsrb = make_image_folder(tmp_path / "gtsrb" / "Train", per_class=3)  # Kaggle's GTSRB: Train/ Test/ Meta/
    make_image_folder(tmp_path / "gtsrb" / "Test", per_class=1, seed=1)
    make_image_folder(tmp_path / "gtsrb" / "Meta", per_class=1, seed=2, classes=("signs",))
    assert discover(gtsrb.parent, SPEC, progress=False).classes == ["checker", "hstripes", "vstripes"]
    vehicles = make_image_folder(tmp_path / "vehicles", per_class=2, classes=("Bus", "Car", "Train"))
    assert discover(vehicles, SPEC, progress=False).classes == ["Bus", "Car", "Train"]  # among classes, a class
    with pytest.raises(UserError, match="a folder named Val/ in .* would be read as its val split"):
        check_out_beside_data(tmp_path / "gtsrb" / "Val", tmp_path / "gtsrb")


def test_nas_and_system_folders_hold_no_images(tiny_folder):
    """Synology's @eaDir/ (a re-encoded thumbnail of every photo, in every folder), recycle bins and
    macOS archive folders are neither images nor classes."""
    photo = sorted((tiny_folder / "checker").glob("*.jpg"))[0]
    thumbs = tiny_folder / "checker" / "@eaDir" / photo.name
    thumbs.mkdir(parents=True)
    Image.open(photo).resize((8, 8)).save(thumbs / "SYNOPHOTO_THUMB_S.jpg")
    make_image_folder(tiny_folder / "@eaDir", per_class=2)  # at the top too: not a class
    make_image_folder(tiny_folder / "#recycle", per_class=2)
    data = discover(tiny_folder, SPEC, progress=False)
    assert data.classes == ["checker", "hstripes", "vstripes"] and len(data.train) + len(data.val) == 24
    assert not data.skipped


def test_copies_stay_on_the_training_side_and_conflicts_are_named(tiny_folder):
    """Byte-identical files: a carved validation image never has a copy in train, and one image
    under two classes is reported as a labelling error."""
    before = discover(tiny_folder, SPEC, val_fraction=0.25, progress=False)
    held = sorted(before.val.paths)[0]  # copied into train under its own class and under another one
    shutil.copy(held, held.with_name("copy_" + held.name))
    other = "vstripes" if held.parent.name != "vstripes" else "checker"
    shutil.copy(held, tiny_folder / other / ("copy_" + held.name))
    data = discover(tiny_folder, SPEC, val_fraction=0.25, progress=False)
    assert not set(data.val.digests) & set(data.train.digests)
    found = data.duplicates()
    assert found.val_in_train == [] and len(data.train) + len(data.val) == len(before.train) + len(before.val) + 2
    assert [sorted(c for _, c in copies) for copies in found.conflicts] == [sorted([held.parent.name] * 2 + [other])]
    assert any("one image, several classes" in line for line in found.lines())


def test_held_out_copies_join_their_training_copy_but_never_empty_a_class():
    digests, labels = ["a", "a", "b", "c", "c", "d", "d"], [0, 0, 0, 1, 1, 1, 1]
    keep, held, moved = keep_copies_together(digests, labels, keep=[0, 3, 5], held=[1, 2, 4, 6])
    assert moved == [1, 4] and keep == [0, 1, 3, 4, 5] and held == [2, 6]  # 6 stays: class 1's last held-out image
    assert keep_copies_together(list("abcd"), [0, 0, 1, 1], [0, 2], [1, 3]) == ([0, 2], [1, 3], [])  # no copies: as split


def test_images_table_survives_any_file_name(tiny_folder, tmp_path):
    """Tab, newline, CR, backslash, U+2028 in names: the run's images.tsv reads back as written, so
    unchanged data is never reported as changed."""
    sources = sorted((tiny_folder / "checker").iterdir())
    for src, name in zip(sources, ["tab\there", "new\nline", "cr\rhere", "back\\slash", "para\u2028sep", "café"]):
        shutil.copy(src, tiny_folder / "checker" / f"{name}.{src.name}")  # a copy in the same class: a warning only
    data = discover(tiny_folder, SPEC, progress=False)
    table = tmp_path / "images.tsv"
    table.write_text(data.images_table(), encoding="utf-8")
    assert read_images_table(table) == data.rows() and data.changes_since(table) is None
    (tiny_folder / "checker" / f"tab\there.{sources[0].name}").write_bytes(sources[2].read_bytes())
    assert discover(tiny_folder, SPEC, progress=False).changes_since(table) == "1 images with new content"


def test_a_val_folder_with_training_images_is_reported(tmp_path):
    make_image_folder(tmp_path / "d" / "train", per_class=4)
    make_image_folder(tmp_path / "d" / "val", per_class=2, seed=1)
    leaked = tmp_path / "d" / "val" / "checker" / "leaked.png"
    shutil.copy(tmp_path / "d" / "train" / "checker" / "000.png", leaked)
    found = discover(tmp_path / "d", SPEC, progress=False).duplicates()
    assert found.val_in_train == [(leaked, tmp_path / "d" / "train" / "checker" / "000.png")]
    assert found.counts() == {"label_conflicts": 0, "val_in_train": 1, "moved_to_train": 0}


def test_split_is_deterministic_and_keeps_one_of_each():
    labels = [0] * 10 + [1] * 2
    assert stratified_split(labels, 0.2, 0) == stratified_split(labels, 0.2, 0)
    keep, held = stratified_split(labels, 0.2, 0)
    assert sorted(keep + held) == list(range(12))
    assert [labels[i] for i in held].count(1) == 1 and [labels[i] for i in keep].count(1) == 1


def test_jpeg_spellings_gif_and_netpbm_are_images(tiny_folder):
    """Windows saves JPEGs as .jfif; GIF and Netpbm are read too: they train, not skipped as 'not an image file'."""
    formats = {"jfif": "JPEG", "jpe": "JPEG", "gif": "GIF", "ppm": "PPM", "pgm": "PPM"}
    for p, (ext, fmt) in zip(sorted((tiny_folder / "checker").iterdir()), formats.items()):
        img = Image.open(p).convert("L" if ext == "pgm" else "RGB")
        img.save(tiny_folder / "checker" / f"photo_{ext}.{ext}", format=fmt)
    data = discover(tiny_folder, SPEC, progress=False)
    assert not data.skipped and sum(data.train.counts(3)) + sum(data.val.counts(3)) == 29


def test_bad_files_skipped_and_listed(tiny_folder):
    (tiny_folder / "checker" / "zero.png").write_bytes(b"")
    (tiny_folder / "checker" / "notes.txt").write_text("hello")
    (tiny_folder / "checker" / "fake.jpg").write_text("hello")
    (tiny_folder / "checker" / "link.png").symlink_to(tiny_folder / "gone.png")  # a link copied without its target
    (tiny_folder / "checker" / "sub").symlink_to(tiny_folder / "gone_dir")  # named as a broken link, not "not an image"
    (tiny_folder / "checker" / "IMG_0001.HEIC").write_bytes(b"\0\0\0\x18ftypheic" + bytes(64))  # an iPhone's photo
    data = discover(tiny_folder, SPEC, progress=False)
    assert len(data.skipped) == 6
    assert any("IMG_0001.HEIC: a HEIC/HEIF photo (iPhones' default format), which this Pillow" in line
               and "convert it to JPEG or PNG" in line for line in data.skipped), data.skipped
    assert any("link.png: broken symbolic link (to " in line and "gone.png" in line for line in data.skipped)
    assert any("sub: broken symbolic link (to " in line for line in data.skipped)
    assert sum(data.train.counts(3)) + sum(data.val.counts(3)) == 24


def test_a_broken_link_in_place_of_a_class_folder_is_refused(tiny_folder, tmp_path):
    """Training and the check would otherwise lose the class without a word."""
    from edge_tl.runtime.check import labelled_images

    (tiny_folder / "zebra").symlink_to(tmp_path / "gone")
    for read in (lambda: discover(tiny_folder, SPEC, progress=False),
                 lambda: labelled_images(tiny_folder, ["checker", "hstripes", "vstripes"], SPEC)):
        with pytest.raises(UserError, match=r"zebra: broken symbolic link \(to .*gone\) where a class folder"):
            read()


@pytest.mark.parametrize("case, match", [
    ("missing", "no such folder"),
    ("empty", "no class sub-folders"),
    ("one_class", "only one class"),
    ("one_image", "only 1 readable image"),
    ("all_broken", "no readable images"),
    ("flat_with_test", "would be trained on as a class"),
    ("val_without_a_class", "val: no readable images of hstripes, so validation"),
    ("flat_with_Valid", r"'Valid' folder beside the class folders \(it holds checker/ like the class folders\) would be"),
])
def test_bad_input_is_a_clear_error(tmp_path, tiny_folder, case, match):
    root = tiny_folder
    if case == "missing":
        root = tmp_path / "nope"
    elif case == "empty":
        root = tmp_path / "empty"
        root.mkdir()
    elif case == "one_class":
        shutil.rmtree(root / "checker")
        shutil.rmtree(root / "hstripes")
    elif case == "one_image":
        for p in sorted((root / "checker").iterdir())[1:]:
            p.unlink()
    elif case == "all_broken":
        (root / "hstripes" / "broken.png").write_bytes(b"\x00garbage")  # skipped elsewhere: not the example given
        for p in (root / "checker").iterdir():
            p.write_bytes(b"\x00garbage")
    elif case == "flat_with_test":
        shutil.copytree(root / "checker", root / "test" / "checker")
    elif case == "val_without_a_class":
        root = tmp_path / "split"
        shutil.copytree(tiny_folder, root / "train")
        for c in ("checker", "vstripes"):
            shutil.copytree(tiny_folder / c, root / "val" / c)
    elif case == "flat_with_Valid":  # any name: a folder of folders named like the classes is a split
        shutil.copytree(root / "checker", root / "Valid" / "checker")
    with pytest.raises(UserError, match=match) as err:
        discover(root, SPEC, progress=False)
    assert str(root) in str(err.value)
    if case == "all_broken":
        assert "hstripes" not in str(err.value)


def test_valid_folder_is_the_validation_split_and_one_training_image_is_enough(tmp_path):
    """Roboflow/Kaggle exports name it valid/; with a validation folder a class may have one training image."""
    make_image_folder(tmp_path / "d" / "train", per_class=4)
    make_image_folder(tmp_path / "d" / "valid", per_class=2, seed=1)
    for extra in sorted((tmp_path / "d" / "train" / "checker").iterdir())[1:]:
        extra.unlink()
    data = discover(tmp_path / "d", SPEC, progress=False)
    assert data.val_source == "valid/ folder" and data.train.counts(3) == [1, 4, 4] and len(data.val) == 6


def test_file_or_empty_class_errors_say_what_is_wrong(tmp_path):
    make_image_folder(tmp_path / "d", per_class=2)
    (tmp_path / "d" / "empty").mkdir()
    with pytest.raises(UserError, match="empty: no readable images \\(the folder is empty\\)"):
        discover(tmp_path / "d", SPEC, progress=False)
    (tmp_path / "f.png").write_bytes(b"x")
    with pytest.raises(UserError, match="is a file, not a folder"):
        discover(tmp_path / "f.png", SPEC, progress=False)


def test_flat_classes_named_valid_and_invalid_are_classes(tmp_path):
    make_image_folder(tmp_path / "d", per_class=4, classes=("checker", "hstripes"))
    for old, new in (("checker", "valid"), ("hstripes", "invalid")):
        (tmp_path / "d" / old).rename(tmp_path / "d" / new)
    data = discover(tmp_path / "d", SPEC, progress=False)
    assert data.classes == ["invalid", "valid"] and data.val_source.startswith("carved from train")


def test_images_that_do_not_fit_in_memory_are_decoded_at_each_use(tmp_path, monkeypatch):
    """A dataset larger than memory still trains: what does not fit is decoded again from its file
    at each use, to the same pixels, in this process or in a DataLoader worker (pickled)."""
    import pickle

    from edge_tl.finetune import data as data_module

    root = make_image_folder(tmp_path / "d", per_class=30)  # 90 images of 32×32 RGB: 3,072 bytes each decoded
    in_memory = discover(root, SPEC, progress=False)
    assert in_memory.memory_note() is None and in_memory.train.on_demand == in_memory.val.on_demand == 0
    monkeypatch.setattr(data_module, "available_memory", lambda: 100_000)  # 70 kB at 70 %: 22 of the 90
    part = discover(root, SPEC, progress=False)
    assert part.train.on_demand + part.val.on_demand == 90 - 22
    assert part.memory_note().startswith("warning: 68 of 90 images do not fit in memory")
    assert part.memory_note().endswith("slower epochs, less so with DataLoader workers decoding them beside the "
                                       "training step; a smaller --img-size or more memory keeps them all.")
    assert part.memory_note("export").endswith("at each use: export takes longer.")
    assert part.train.paths == in_memory.train.paths and part.val.paths == in_memory.val.paths
    for split, ref in ((part.train, in_memory.train), (part.val, in_memory.val)):
        on_demand = [i for i, a in enumerate(split.arrays) if a is None]
        assert on_demand and all((split.array(i) == ref.array(i)).all() for i in range(len(split)))
        copy = pickle.loads(pickle.dumps(split))  # how a spawned DataLoader worker gets it
        assert (copy.array(on_demand[0]) == ref.array(on_demand[0])).all()
    monkeypatch.setenv("LOCAL_WORLD_SIZE", "2")  # torchrun: each process on this machine holds its own copy
    halved = discover(root, SPEC, progress=False)
    assert halved.train.on_demand + halved.val.on_demand == 90 - 11
    first, second = [i for i, a in enumerate(part.train.arrays) if a is None][:2]
    other = next(p for p in part.train.paths if p.parent != part.train.paths[first].parent)
    shutil.copyfile(other, part.train.paths[first])  # another class's image under this one's name: a wrong label
    with pytest.raises(UserError, match=rf"{part.train.paths[first].name}: its content changed since the data was "
                                        r"scanned\. .* restore it, or remove it, and run again \(a fine-tune with --resume"):
        part.train.image(first)
    part.train.paths[second].unlink()
    with pytest.raises(UserError, match=rf"{part.train.paths[second].name}: can no longer be read \(No such file"):
        part.train.image(second)


def test_the_memory_warning_gives_the_numbers(monkeypatch):
    from types import SimpleNamespace

    from edge_tl.finetune.data import DecodeBudget

    budget = DecodeBudget(100e9)  # 70 GB for this process
    kept = [budget.keep(SimpleNamespace(nbytes=30e9)) for _ in range(4)]
    assert kept == [True, True, False, False]
    assert budget.note(2, 4) == (
        "warning: 2 of 4 images do not fit in memory (decoded they take 120.00 GB; this process can keep 70.0 GB: "
        "70% of the 100.0 GB available), so they are decoded again from their files at each use: slower epochs, "
        "less so with DataLoader workers decoding them beside the training step; a smaller --img-size or more memory "
        "keeps them all.")
    assert budget.note(0, 4) is None
    monkeypatch.setenv("LOCAL_WORLD_SIZE", "8")  # torchrun: the machine's 70 % shared by its 8 processes
    budget = DecodeBudget(100e9)
    assert [budget.keep(SimpleNamespace(nbytes=5e9)) for _ in range(2)] == [True, False]
    assert "(decoded they take 10.00 GB; each of the 8 processes on this machine can keep 8.8 GB: 70% of the " \
           "100.0 GB available)" in budget.note(1, 2)


def test_memory_is_read_where_proc_meminfo_is_missing(monkeypatch):
    """macOS has no /proc: half the physical memory (os.sysconf) stands in for what is available."""
    import os

    from edge_tl.finetune import data as data_module

    assert data_module.available_memory() > 0  # Linux: MemAvailable
    real_read = Path.read_text
    monkeypatch.setattr(Path, "read_text", lambda self, *a, **k: (_ for _ in ()).throw(FileNotFoundError(self))
                        if str(self) == "/proc/meminfo" else real_read(self, *a, **k))
    assert data_module.available_memory() == os.sysconf("SC_PHYS_PAGES") * os.sysconf("SC_PAGE_SIZE") // 2


def test_decoding_on_several_threads_gives_what_one_gives(tmp_path, monkeypatch):
    """The one-time decoding runs on every core (Pillow lets go of the GIL); the images, their
    order, digests and the skipped files' list are those of one thread."""
    from edge_tl.finetune import data as data_module

    root = make_image_folder(tmp_path / "d", per_class=12)
    (root / "checker" / "broken.png").write_bytes(b"not a png")
    (root / "hstripes" / "notes.txt").write_text("not an image")
    runs = {}
    for threads in (1, 3):
        monkeypatch.setattr(data_module, "decode_threads", lambda t=threads: t)
        runs[threads] = discover(root, SPEC, progress=False)
    one, three = runs[1], runs[3]
    assert len(one.skipped) == 2 and one.skipped == three.skipped
    for a, b in ((one.train, three.train), (one.val, three.val)):
        assert (a.paths, a.labels, a.digests) == (b.paths, b.labels, b.digests)
        assert all((x == y).all() for x, y in zip(a.arrays, b.arrays))



def test_class_names_with_control_characters_are_refused(tiny_folder):
    """labels.txt holds one class per line: a newline in a folder name made a bundle its own check refused."""
    (tiny_folder / "hstripes").rename(tiny_folder / "h\nstripes")
    with pytest.raises(UserError, match=r"h\nstripes: a class folder whose name holds a control character "
                                        r"\('h\\nstripes': a newline or tab\?\); .* rename the folder"):
        discover(tiny_folder, SPEC, progress=False)


def test_a_folder_of_images_beside_train_is_listed_as_not_read(tmp_path):
    """DIR/train/<class>/ + DIR/dog/: the dog class would vanish from the classes unseen."""
    make_image_folder(tmp_path / "d" / "train", per_class=4)
    make_image_folder(tmp_path / "d" / "test", per_class=1)
    make_image_folder(tmp_path / "d", per_class=3, classes=("dog",))
    (tmp_path / "d" / "notes").mkdir()
    (tmp_path / "d" / "notes" / "readme.txt").write_text("no images here")
    make_image_folder(tmp_path / "d" / "out", per_class=1, classes=("plots",))  # a fine-tune's --out beside train/
    (tmp_path / "d" / "out" / "metrics.json").write_text("{}")
    data = discover(tmp_path / "d", SPEC, progress=False)
    assert data.skipped == [f"{tmp_path / 'd' / 'dog'}: 3 image files beside train/, not read (a fine-tune reads "
                            "train/<class>/ and the validation folder): move it into train/ if it is a class"]


def test_photos_left_outside_the_class_folders_are_listed_as_not_read(tmp_path):
    """A photo dropped into DIR/, DIR/train/ or DIR/val/ beside the class folders was passed over in silence."""
    import shutil

    flat = make_image_folder(tmp_path / "flat", per_class=3)
    shutil.copy(flat / "checker" / "000.png", flat / "IMG_0042.JPG")
    assert discover(flat, SPEC, progress=False).skipped == [
        f"{flat}: 1 image files directly in it, outside the class folders, not read (e.g. IMG_0042.JPG): move them into "
        "a class folder to use them"]
    split = tmp_path / "split"
    make_image_folder(split / "train", per_class=3)
    make_image_folder(split / "val", per_class=1)
    for where in (split, split / "train", split / "val", split / "val"):
        shutil.copy(flat / "checker" / "000.png", where / f"stray{len(list(where.iterdir()))}.png")
    (split / "notes.txt").write_text("not an image")
    skipped = discover(split, SPEC, progress=False).skipped
    assert [line.split(": ", 1)[0] for line in skipped] == [str(split), str(split / "train"), str(split / "val")]
    assert skipped[2].endswith("2 image files directly in it, outside the class folders, not read (e.g. stray3.png): "
                               "move them into val/<class>/ to use them")
    assert "move them into train/<class>/" in skipped[0]


def test_images_the_model_sees_poorly_are_noted(tiny_folder):
    """Flat (a 16-bit file holding 8-bit values turns black), much upscaled (8x8 digits), mostly cropped
    away (a 20:1 strip): trained on all the same, each kind noted once with an example."""
    import numpy as np

    assert discover(tiny_folder, SPEC, progress=False).odd.lines() == []  # 40-px patterns at 32 px: nothing to note
    Image.fromarray(np.full((40, 40), 170, np.uint16)).save(tiny_folder / "checker" / "dim16.png")  # I;16, max 170
    Image.new("RGB", (8, 8), (200, 30, 30)).save(tiny_folder / "hstripes" / "tiny.png")  # a flat colour, not grey
    Image.fromarray(np.arange(40 * 40, dtype=np.uint16).reshape(40, 40) * 2).save(tiny_folder / "vstripes" / "d12.png")
    Image.effect_noise((400, 20), 60).convert("RGB").save(tiny_folder / "vstripes" / "strip.png")
    data = discover(tiny_folder, PreprocessSpec(input_size=(32, 32), crop_pct=0.875), progress=False)
    assert data.odd.counts() == {"flat": 2, "dark": 1, "upscaled": 1, "cropped": 1}  # the 8x8 is flat too
    assert sorted(p.name for p in data.odd.flat) == ["dim16.png", "tiny.png"]
    notes = data.odd.notes(PreprocessSpec(input_size=(32, 32), crop_pct=0.875))
    assert len(notes) == 4 and "16-bit files holding 8-bit values" in notes[0]
    assert "d12.png: 12-bit data in 16-bit files keeps only 16 grey levels" in notes[1]  # values 0-3198: 0-12
    assert "(the smallest 8×8: " in notes[2] and "upscaled up to 4 times" in notes[2]
    assert "(the longest 400×20: " in notes[3] and "strip.png" in notes[3]
    lines = data.odd.lines()
    assert lines[0] == "kind\tpath\tsize" and len(lines) == 1 + sum(data.odd.counts().values())
    assert all(len(line.split("\t")) == 3 for line in lines)


def test_calibration_samples_are_exactly_as_many_as_asked_and_stratified():
    """--calib-images 16 of 36 images in four classes gave 15 (per-class rounding, never topped up),
    and 4 of five classes all came from the largest."""
    from collections import Counter

    from edge_tl.finetune.data import stratified_sample

    labels = [0] * 2 + [1] * 10 + [2] * 10 + [3] * 14
    picked = stratified_sample(labels, 16)
    assert len(picked) == len(set(picked)) == 16
    assert Counter(labels[i] for i in picked) == {0: 1, 1: 5, 2: 4, 3: 6}  # shares 0.9, 4.4, 4.4, 6.2
    few = [0] * 30 + [1, 1, 2, 3, 4]
    assert Counter(few[i] for i in stratified_sample(few, 3)) == {0: 1, 1: 1, 2: 1}  # one each, largest first
    assert stratified_sample(labels, 99) == list(range(36))
    assert stratified_sample(labels, 16) == picked  # the same images for the same seed
