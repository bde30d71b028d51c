"""Parse UCF101 and HMDB51 split files into ``{part: [video stem, ...]}``.

UCF101 (``ucfTrainTestlist``): ``trainlist0N.txt`` lines ``Class/v_Class_g08_c01.avi 1`` and
``testlist0N.txt`` lines ``Class/v_Class_g01_c01.avi``.
HMDB51 (``testTrainMulti_7030_splits``): ``<class>_test_splitN.txt`` lines ``video.avi K`` with
K = 1 train, 2 test, 0 unused.
"""

from __future__ import annotations

from pathlib import Path, PurePosixPath

from storage.ids import safe_video_id

SPLIT_FORMATS = ("ucf101", "hmdb51")


def _check(directory: Path, split: int) -> None:
    if split not in (1, 2, 3):
        raise ValueError(f"split must be 1, 2 or 3, got {split!r}")
    if not directory.is_dir():
        raise FileNotFoundError(f"split directory {str(directory)!r} does not exist")


def _stem(entry: str) -> str:
    return safe_video_id(PurePosixPath(entry.replace("\\", "/")).stem)


def parse_ucf101(directory: str | Path, split: int) -> dict[str, list[str]]:
    directory = Path(directory)
    _check(directory, split)
    parts: dict[str, list[str]] = {}
    for part, fname in (("train", f"trainlist0{split}.txt"), ("test", f"testlist0{split}.txt")):
        path = directory / fname
        if not path.is_file():
            raise FileNotFoundError(f"UCF101 split file {str(path)!r} not found")
        ids = []
        for lineno, line in enumerate(path.read_text().splitlines(), 1):
            line = line.strip()
            if not line:
                continue
            fields = line.split()
            if part == "train" and len(fields) not in (1, 2):
                raise ValueError(f"{path}:{lineno}: expected 'path [label]', got {line!r}")
            ids.append(_stem(fields[0]))
        parts[part] = ids
    return parts


def parse_hmdb51(directory: str | Path, split: int) -> dict[str, list[str]]:
    directory = Path(directory)
    _check(directory, split)
    files = sorted(directory.glob(f"*_test_split{split}.txt"))
    if not files:
        raise FileNotFoundError(
            f"no HMDB51 split files '*_test_split{split}.txt' in {str(directory)!r}"
        )
    parts: dict[str, list[str]] = {"train": [], "test": []}
    for path in files:
        for lineno, line in enumerate(path.read_text().splitlines(), 1):
            fields = line.split()
            if not fields:
                continue
            if len(fields) != 2 or fields[1] not in ("0", "1", "2"):
                raise ValueError(f"{path}:{lineno}: expected 'video.avi 0|1|2', got {line!r}")
            if fields[1] == "1":
                parts["train"].append(_stem(fields[0]))
            elif fields[1] == "2":
                parts["test"].append(_stem(fields[0]))
    return parts


def parse_splits(fmt: str, directory: str | Path, split: int) -> dict[str, list[str]]:
    if fmt == "ucf101":
        return parse_ucf101(directory, split)
    if fmt == "hmdb51":
        return parse_hmdb51(directory, split)
    raise ValueError(f"split format must be one of {SPLIT_FORMATS}, got {fmt!r}")
