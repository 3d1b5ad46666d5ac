"""Decoding: every awkward input is either converted or skipped with a reason."""

import argparse
import os

import numpy as np
import pytest
import torch
from PIL import Image, ImageOps
from torchvision import transforms as T

from badfiles import make_bad_folder, png_header_only
from engine.errors import InputError
from engine.files import dataset_file
from engine.images import DecodedBatches, ImageError, iter_batches, list_images, load_preprocessed, open_image
from engine.models import Preprocessing
from neurocat.cli import check_options
from storage.manifest import build_manifest

TENCH = "n01440764/n01440764_tench.JPEG"


def test_preprocessing_equals_torchvision(shared_images):
    """Every shared image that decodes, bit for bit; with the default `jpeg_draft` too, except
    the JPEGs of at least 1024 px a side (decoded at a reduced scale: the next test)."""
    prep, full = Preprocessing(), Preprocessing(jpeg_draft=False)
    assert prep.jpeg_draft
    reference = T.Compose([T.Resize(256), T.CenterCrop(224), T.ToTensor(), T.Normalize(prep.mean, prep.std)])
    compared = large = 0
    for path in sorted(shared_images.glob("*/*")):
        try:
            ours = load_preprocessed(path, full)
        except ImageError:
            continue
        theirs = reference(Image.open(path).convert("RGB"))
        assert torch.allclose(prep.normalize(torch.from_numpy(ours)[None])[0], theirs, atol=1e-6), path
        if min(Image.open(path).size) < 1024:
            assert np.array_equal(load_preprocessed(path, prep), ours), path
        else:
            large += 1
        compared += 1
    assert compared >= 240 and large <= 2


def test_large_jpeg_decodes_at_a_reduced_scale_close_to_the_full_decode(tmp_path, shared_images, model):
    path = tmp_path / "photo.jpg"
    Image.open(shared_images / TENCH).convert("RGB").resize((4032, 3024), Image.BICUBIC).save(path, quality=92)
    assert open_image(path).size == (4032, 3024)
    assert open_image(path, at_least=512).size == (1008, 756)  # 1/4: both sides stay >= 2 x 256
    drafted = load_preprocessed(path, Preprocessing())
    full = load_preprocessed(path, Preprocessing(jpeg_draft=False))
    diff = np.abs(drafted.astype(int) - full)
    assert 0 < diff.mean() < 0.5 and diff.max() <= 8
    x = model.preprocessing.normalize(torch.from_numpy(np.stack([drafted, full])))
    with torch.no_grad():
        logits = model.module(x)
    assert logits[0].argmax() == logits[1].argmax()
    assert (logits[0] - logits[1]).abs().max() < 0.25  # measured 0.06


def test_awkward_files(tmp_path, shared_images):
    expected = make_bad_folder(tmp_path, shared_images / TENCH)
    manifest = build_manifest(tmp_path)
    assert set(manifest["path"]) == set(expected)
    prep = Preprocessing()
    items = [(i, dataset_file(tmp_path, p)) for i, p in enumerate(manifest["path"]) if manifest["status"][i] == "ok"]
    decoded, failed = {}, {}
    for batch in iter_batches(items, prep, batch_size=4):
        for i, img in zip(batch.indices, batch.images):
            decoded[manifest["path"][i]] = img.numpy()
        failed.update({manifest["path"][i]: r for i, r in batch.failed})
    reasons = dict(zip(manifest["path"], manifest["reason"])) | failed
    for path, status in expected.items():
        if status == "ok":
            assert path in decoded, (path, reasons.get(path))
            assert decoded[path].shape == (224, 224, 3) and decoded[path].dtype == np.uint8
        else:
            assert path not in decoded and reasons[path], path
    assert "empty" in reasons["n01440764/empty.jpg"]
    assert "not an image" in reasons["n01440764/notes.jpg"]
    assert "bomb" in reasons["n01440764/bomb.png"]
    assert "truncated" in reasons["n01440764/truncated.jpg"]
    assert "aspect ratio" in reasons["n01440764/line.png"] and "cannot decode" in reasons["n01440764/corrupt_header.png"]
    # a malformed EXIF block still turns the picture upright (Orientation 6: a quarter turn)
    with Image.open(tmp_path / "n01440764/bad_exif.jpg") as bad:
        assert open_image(tmp_path / "n01440764/bad_exif.jpg").size == bad.size[::-1]
    # conversions keep the picture: 16-bit and grayscale agree with the 8-bit gray version
    gray, sixteen = decoded["n01440764/gray.jpg"].astype(int), decoded["n01440764/sixteen_bit.png"].astype(int)
    assert np.abs(gray - sixteen).mean() < 3
    assert np.abs(decoded["n01440764/cmyk.jpg"].astype(int) - decoded["n01440764/good.jpg"].astype(int)).mean() < 8


def test_decoded_batches_skip_all_failed_batches_and_keep_every_failure(tmp_path, shared_images):
    """What shard tasks record: every failure of iter_batches, in order, with its reason;
    what they compute on: the same images, without the batch whose every file failed."""
    make_bad_folder(tmp_path, shared_images / TENCH)
    names = ["good.jpg", "empty.jpg", "truncated.jpg", "notes.jpg", "bomb.png", "gray.jpg"]
    items = [(i, str(tmp_path / "n01440764" / name)) for i, name in enumerate(names)]
    prep = Preprocessing()
    raw = list(iter_batches(items, prep, batch_size=2))
    decoded = DecodedBatches(items, prep, batch_size=2)
    batches = list(decoded)
    assert [b.indices.tolist() for b in raw] == [[0], [], [5]]
    assert [b.indices.tolist() for b in batches] == [[0], [5]]
    assert all(torch.equal(a.images, b.images) for a, b in zip(batches, [raw[0], raw[2]]))
    assert decoded.failed == [f for b in raw for f in b.failed]
    assert [i for i, _ in decoded.failed] == [1, 2, 3, 4]
    assert all(reason for _, reason in decoded.failed)


def test_bomb_is_refused_before_decoding(tmp_path):
    path = tmp_path / "bomb.png"
    path.write_bytes(png_header_only(20000, 20000))
    with pytest.raises(ImageError, match="decompression bomb"):
        open_image(path)


def test_listing_is_recursive_and_labels_folders(tmp_path, shared_images):
    for rel in ["train/n01440764/a.jpg", "val/n01440764/b.jpg", "flat.jpg", ".hidden/x.jpg", "n02/sub/c.jpg"]:
        (tmp_path / rel).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / rel).write_bytes((shared_images / TENCH).read_bytes())
    entries = {e.path: e for e in list_images(tmp_path)}
    assert set(entries) == {"train/n01440764/a.jpg", "val/n01440764/b.jpg", "flat.jpg", "n02/sub/c.jpg"}
    assert entries["train/n01440764/a.jpg"].label == "n01440764" and entries["train/n01440764/a.jpg"].split == "train"
    assert entries["flat.jpg"].label is None
    assert entries["n02/sub/c.jpg"].label == "sub"


def test_a_folder_that_cannot_be_listed_is_a_skipped_row_not_a_gap(tmp_path, shared_images, unlistable):
    """A class folder without read permission vanished from the listing, its files neither
    used nor mentioned: now it is one manifest row, the folder's path with the label and
    split its files would have, skipped with the reason. An unlistable data folder is a
    one-line error (it was an empty dataset). As root, the `unlistable` fixture fakes the
    permission error, since chmod 000 does not stop root."""
    data = tmp_path / "data"
    for rel in ["train/n01440764/a.jpg", "train/n01443537/b.jpg", "n01484850/c.jpg"]:
        (data / rel).parent.mkdir(parents=True, exist_ok=True)
        (data / rel).write_bytes((shared_images / TENCH).read_bytes())
    unlistable(data / "train" / "n01443537")
    unlistable(data / "n01484850")
    manifest = build_manifest(data)
    assert manifest[["path", "label", "split", "status", "reason"]].fillna("-").values.tolist() == [
        ["n01484850", "n01484850", "-", "skipped", "unreadable folder: Permission denied"],
        ["train/n01440764/a.jpg", "n01440764", "train", "ok", "-"],
        ["train/n01443537", "n01443537", "train", "skipped", "unreadable folder: Permission denied"]]
    unlistable(data)
    with pytest.raises(InputError, match="data folder cannot be listed"):
        list_images(data)
    with pytest.raises(InputError, match="data folder cannot be listed"):
        check_options(argparse.Namespace(data=str(data)))


def test_linked_folders_are_followed_once_and_dead_links_and_pipes_are_skipped_rows(tmp_path, shared_images):
    """A class folder that is a symbolic link (a dataset assembled from shared storage) was
    not entered: its images were silently absent. Now it is followed, once per real folder
    (a link loop does not recurse); a link to nothing and a named pipe, dropped silently
    before, are skipped rows with their reason (a pipe is never opened: reading it blocks)."""
    store = tmp_path / "elsewhere" / "n01443537"
    store.mkdir(parents=True)
    (store / "b.jpg").write_bytes((shared_images / TENCH).read_bytes())
    data = tmp_path / "data"
    (data / "n01440764").mkdir(parents=True)
    (data / "n01440764" / "a.jpg").write_bytes((shared_images / TENCH).read_bytes())
    (data / "n01443537").symlink_to(store)
    (data / "n01440764" / "loop").symlink_to(data)  # back to the root: not a second copy of it
    (data / "n01440764" / "gone.jpg").symlink_to(tmp_path / "nowhere.jpg")
    os.mkfifo(data / "n01440764" / "pipe.jpg")
    manifest = build_manifest(data)
    assert manifest[["path", "label", "status", "reason"]].fillna("-").values.tolist() == [
        ["n01440764/a.jpg", "n01440764", "ok", "-"],
        ["n01440764/gone.jpg", "n01440764", "skipped", "broken symbolic link"],
        ["n01440764/pipe.jpg", "n01440764", "skipped", "not a regular file (a pipe, socket or device)"],
        ["n01443537/b.jpg", "n01443537", "ok", "-"]]


@pytest.mark.parametrize("orientation", [3, 6, 8])
def test_exif_orientation_is_applied(tmp_path, shared_images, orientation):
    """A camera JPEG stored sideways with an EXIF Orientation tag decodes upright: the same
    pixels as Pillow's own transpose of a plainly decoded copy."""
    source = Image.open(next(shared_images.glob("*/*"))).convert("RGB").crop((0, 0, 120, 80))
    exif = Image.Exif()
    exif[0x0112] = orientation
    path = tmp_path / f"o{orientation}.jpg"
    source.save(path, exif=exif, quality=95)
    upright = open_image(path)
    with Image.open(path) as plain:
        want = np.asarray(ImageOps.exif_transpose(plain.convert("RGB")))
    assert upright.size == ((80, 120) if orientation in (6, 8) else (120, 80))
    assert np.array_equal(np.asarray(upright), want)


def test_manifest_rehashes_a_file_rewritten_with_its_old_size_and_mtime(tmp_path, shared_images):
    """Hashes are reused for unchanged files only: an image rewritten in place with the same
    size and mtime put back (as `cp -p` or a restoring tool does) gets its new content's hash."""
    import hashlib
    import os
    import shutil

    (tmp_path / "a").mkdir()
    src = sorted(shared_images.glob("*/*"))[:3]
    for p in src:
        shutil.copy2(p, tmp_path / "a" / p.name)
    first = build_manifest(tmp_path)
    again = build_manifest(tmp_path, first)
    assert list(again["sha256"]) == list(first["sha256"])
    target = tmp_path / "a" / src[0].name
    st = target.stat()
    data = bytearray(target.read_bytes())
    data[-3] ^= 0xFF  # inside the JPEG's entropy data: same size, other bytes
    with open(target, "r+b") as f:  # in place: same inode
        f.write(data)
    os.utime(target, ns=(st.st_atime_ns, st.st_mtime_ns))
    assert target.stat().st_size == st.st_size and target.stat().st_mtime_ns == st.st_mtime_ns
    after = build_manifest(tmp_path, first)
    row = list(after["path"]).index(f"a/{src[0].name}")
    assert after["sha256"][row] == hashlib.sha256(bytes(data)).hexdigest() != first["sha256"][row]
    assert (after["sha256"] == first["sha256"]).sum() == 2
