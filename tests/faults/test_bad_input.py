"""Bad input gets one line on stderr naming the value and what is accepted, exit code 2, before any
server or flow starts, and no traceback."""

import re

import pytest
import torch

from imagesmith.cli import main


def _png_header(path, width: int, height: int) -> None:
    """A PNG whose header says ``width`` x ``height`` (PIL checks the size when opening: a bomb)."""
    import struct
    import zlib

    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    ihdr = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    path.write_bytes(b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", zlib.compress(b"\0" * 16))
                     + chunk(b"IEND", b""))


@pytest.fixture
def files(tmp_path, monkeypatch):
    monkeypatch.setenv("IMAGESMITH_FAST_DIR", str(tmp_path / "fast"))
    monkeypatch.setenv("IMAGESMITH_BULK_DIR", str(tmp_path / "bulk"))
    (tmp_path / "no-train").mkdir()
    (tmp_path / "notes.txt").write_text("not an image")
    (tmp_path / "ds" / "train" / "n01440764").mkdir(parents=True)

    class Evil:  # a pickle that runs a command when loaded
        def __reduce__(self):
            return (__import__("os").system, (f"touch {tmp_path / 'PWNED'}",))

    torch.save({"model": Evil(), "superres": {"arch": "johnson", "scale": 4}}, tmp_path / "evil.pt")
    from PIL import Image

    Image.new("RGB", (40, 30), (200, 120, 40)).save(tmp_path / "photo.png")
    _png_header(tmp_path / "big20000.png", 20000, 20000)
    other = tmp_path / "fast" / "resize" / "0123456789abcdef"  # a finished stage of another kind
    other.mkdir(parents=True)
    (other / "manifest.json").write_text('{"stage": "resize", "key": "0123456789abcdef"}')
    return tmp_path


CASES = {
    "missing source": (["run", "--source", "{t}/nope"], r"source '.*/nope' does not exist; expected .*train/<wnid>"),
    "source is a file": (["run", "--source", "{t}/notes.txt"], r"is not a folder"),
    "source without train/": (["run", "--source", "{t}/no-train"], r"has no train/ folder"),
    "size 0": (["run", "--size", "0"], r"argument --size: 0 is out of range; use a number between 8 and 4096"),
    "size -5": (["run", "--size", "-5"], r"-5 is out of range; use a number between 8 and 4096"),
    "size 100000": (["run", "--size", "100000"], r"100000 is out of range"),
    "size not a number": (["run", "--size", "big"], r"'big' is not a whole number"),
    "missing word vectors": (["run", "--word-vectors", "{t}/GoogleNews.bin"], r"word vectors not found at"),
    "unknown crappifier": (["run", "--crappifier", "blur"], r"invalid choice: 'blur'"),
    "words -k -3": (["words", "dog", "-k", "-3"], r"argument -k: -3 is out of range; use a number between 1 and 1000000"),
    "words empty text": (["words", "  "], r"the text is empty"),
    "words missing table": (["words", "dog", "--table", "{t}/nope"], r"--table '.*/nope' is not a finished 'embeddings'"),
    "search empty text": (["search", "--text", ""], r"--text is empty"),
    "search missing image": (["search", "--image", "{t}/cat.jpg"], r"image '.*/cat.jpg' does not exist"),
    "search non-image": (["search", "--image", "{t}/notes.txt"], r"notes.txt' is not a readable image"),
    "search no index": (["search", "--text", "dog"], r"no finished 'devise-index' stage under"),
    "enhance missing model": (["enhance", "{t}/model.pt", "{t}/a.png", "{t}/b.png"], r"model '.*/model.pt' does not exist"),
    "enhance pickle model": (["enhance", "{t}/evil.pt", "{t}/photo.png", "{t}/b.png"],
                             r"evil.pt is not a plain weights file: .* could run code .* refusing to load it"),
    "evaluate missing store": (["evaluate-superres", "{t}/evil.pt", "{t}/val.h5"], r"store '.*/val.h5' does not exist"),
    "evaluate non-store": (["evaluate-superres", "{t}/evil.pt", "{t}/notes.txt"], r"notes.txt"),
    "devise finetune 1": (["devise", "--finetune-epochs", "1"], r"use 0 \(no fine-tuning\) or at least 2"),
    "devise bad zero-shot": (["devise", "--zero-shot", "motorcycle"], r"'motorcycle' is not a WordNet noun id"),
    "devise zero-shot inside 1k": (["devise", "--zero-shot", "n03790512", "n07920052"],
                                   r"--zero-shot classes \[.n07920052.\] are ImageNet-1k classes"),
    "devise zero-shot source missing": (["devise", "--zero-shot-source", "/nonexistent/zs"], r"/nonexistent/zs"),
    "devise epochs 1": (["devise", "--epochs", "1"], r"argument --epochs: 1 is out of range; use a number between 2 and 1000000"),
    "demo port": (["demo", "--port", "0"], r"argument --port: 0 is out of range"),
    "stylize two paths": (["stylize", "{t}/photo.png", "{t}/out.png"],
                          r"stylize --mode transfer takes CONTENT STYLE OUT \(3 paths\), got 2"),
    "stylize missing content": (["stylize", "{t}/nope.jpg", "{t}/photo.png", "{t}/out.png"],
                                r"image '.*/nope.jpg' does not exist"),
    "stylize non-image style": (["stylize", "{t}/photo.png", "{t}/notes.txt", "{t}/out.png"],
                                r"notes.txt' is not a readable image"),
    "stylize output suffix": (["stylize", "{t}/photo.png", "{t}/photo.png", "{t}/out.txt"],
                              r"output '.*/out.txt' has no image suffix"),
    "stylize output folder": (["stylize", "{t}/photo.png", "{t}/photo.png", "{t}/nodir/out.png"],
                              r"folder '.*/nodir' does not exist"),
    "stylize style weights": (["stylize", "{t}/photo.png", "{t}/photo.png", "{t}/o.png", "--style-weights", "1,2"],
                              r"'1,2': --style-weights takes 5 comma-separated finite numbers >= 0"),
    "stylize negative lr": (["stylize", "--lr", "-1", "{t}/photo.png", "{t}/photo.png", "{t}/o.png"],
                            r"argument --lr: -1 is out of range; use a number > 0"),
    "stylize too many scales": (["stylize", "--size", "64", "--scales", "3", "{t}/photo.png", "{t}/photo.png",
                                 "{t}/o.png"], r"3 scales start at 16 px; .*coarsest must be >= 32"),
    "stylize pickle model": (["stylize", "--model", "{t}/evil.pt", "{t}/photo.png", "{t}/o.png"],
                             r"evil.pt is not a plain weights file"),
    "stylize model three paths": (["stylize", "--model", "{t}/evil.pt", "{t}/photo.png", "{t}/photo.png", "{t}/o.png"],
                                  r"with --model, stylize takes CONTENT OUT \(2 paths\), got 3"),
    "style missing image": (["style", "--style", "{t}/nope.jpg"], r"style image '.*/nope.jpg' does not exist"),
    "style non-image": (["style", "--style", "{t}/notes.txt"], r"style image '.*/notes.txt' is not a readable image"),
    "style weights": (["style", "--style-weights", "a,b"], r"'a,b' is not 5 comma-separated numbers"),
    "superres gpus 0": (["superres", "--gpus", "0"], r"argument --gpus: 0 is out of range; use a number between 1 and 64"),
    "superres sizes": (["superres", "--high-size", "100", "--low-size", "32"], r"--high-size 100 must be a multiple"),
    "superres progressive": (["superres", "--progressive-from", "200"], r"--progressive-from 200 must lie between"),
    "gc without --keep": (["gc"], r"the following arguments are required: --keep"),
    "gc keep 0": (["gc", "--keep", "0"], r"argument --keep: 0 is out of range; use a number between 1 and 1000000"),
    "archive a folder that is not a stage": (["archive", "{t}/no-train"], r"STAGE_DIR '.*/no-train' is not a finished "
                                                                        r"stage directory"),
    "status runs 0": (["status", "--runs", "0"], r"argument --runs: 0 is out of range"),
    "demo port 0": (["demo", "--port", "0"], r"argument --port: 0 is out of range"),
    "gan gpus": (["gan", "--gpus", "x"], r"argument --gpus: 'x' is not a whole number"),
    # not finite, or past any sensible bound (issue 22.7: these exited 0 writing a black image, or trained on)
    "stylize nan style weight": (["stylize", "{t}/photo.png", "{t}/photo.png", "{t}/o.png", "--style-weights",
                                  "nan,1,1,1,1"], r"'nan,1,1,1,1': --style-weights takes 5 comma-separated finite"),
    "stylize inf tv weight": (["stylize", "--tv-weight", "inf", "{t}/photo.png", "{t}/photo.png", "{t}/o.png"],
                              r"argument --tv-weight: inf is not a finite number; use a number >= 0 and <= 1e\+12"),
    "stylize inf lr": (["stylize", "--lr", "inf", "{t}/photo.png", "{t}/photo.png", "{t}/o.png"],
                       r"argument --lr: inf is not a finite number; use a number > 0 and <= 10"),
    "superres inf lr": (["superres", "--lr", "inf"], r"argument --lr: inf is not a finite number"),
    "superres nan lr": (["superres", "--lr", "nan"], r"argument --lr: nan is not a finite number"),
    "superres lr 100": (["superres", "--lr", "100"], r"argument --lr: 100 is out of range; use a number > 0 and <= 10"),
    "superres epochs huge": (["superres", "--epochs", "999999999999999"],
                             r"argument --epochs: 999999999999999 is out of range; use a number between 2 and 1000000"),
    "style inf content weight": (["style", "--content-weight", "inf"], r"argument --content-weight: inf is not a finite"),
    "devise unknown backbone": (["devise", "--backbone", "resnet9000"],
                                r"--backbone 'resnet9000' is not a backbone this build accepts; choose one of auto"),
    "gan generator of another stage": (["gan", "--generator", "{t}/fast/resize/0123456789abcdef"],
                                       r"--generator '.*' is a finished 'resize' stage; a 'superres' stage directory"),
    "enhance a decompression bomb": (["enhance", "{t}/evil.pt", "{t}/big20000.png", "{t}/o.png"],
                                     r"big20000.png' is larger than the 89,478,485-pixel limit .* pass --max-pixels N"),
    "search a decompression bomb": (["search", "--image", "{t}/big20000.png"],
                                    r"big20000.png' is larger than the 89,478,485-pixel limit"),
    "enhance output a folder": (["enhance", "{t}/evil.pt", "{t}/photo.png", "{t}"], r"output '.*' is a folder"),
    "enhance output suffix": (["enhance", "{t}/evil.pt", "{t}/photo.png", "{t}/o.txt"], r"has no image suffix"),
    "sample into a full folder": (["sample", "--out", "{t}"], r"is not empty; choose a new folder"),
}


@pytest.mark.parametrize("case", sorted(CASES))
def test_bad_input_is_one_line_and_exit_2(case, files, capsys):
    argv, pattern = CASES[case]
    with _returns() as result:
        result.code = main([a.replace("{t}", str(files)) for a in argv])
    err = capsys.readouterr().err
    lines = err.strip().splitlines()
    assert result.code == 2, err
    assert len(lines) == 1 and lines[0].startswith("error: ") and "Traceback" not in err, err
    assert re.search(pattern, lines[0]), lines[0]
    assert not (files / "PWNED").exists()  # nothing we were handed ran


class _returns:
    """Captures ``main``'s exit code whether it returns it or argparse exits with it."""

    code = None

    def __enter__(self):
        return self

    def __exit__(self, kind, error, tb):
        if kind is SystemExit:
            self.code = error.code
            return True
        return False


@pytest.mark.parametrize("command", [["run"], ["superres"], ["devise"], ["status"]])
def test_a_tier_that_is_a_file_is_one_line_before_any_flow(command, tmp_path, monkeypatch, capsys):
    (tmp_path / "afile").write_text("")
    monkeypatch.setenv("IMAGESMITH_FAST_DIR", str(tmp_path / "afile" / "fast"))
    with _returns() as result:
        result.code = main(command)
    err = capsys.readouterr().err
    assert result.code == 2 and len(err.strip().splitlines()) == 1 and "Traceback" not in err, err
    assert f"IMAGESMITH_FAST_DIR={tmp_path / 'afile' / 'fast'}: {tmp_path / 'afile'} is a file, not a folder" in err
