import stat

import pandas as pd

from stages.common import atomic_path, write_csv, write_json


def test_outputs_are_readable_by_others_not_private_temporaries(tmp_path):
    write_json(tmp_path / "m.json", {"a": 1})
    write_csv(tmp_path / "t.csv", pd.DataFrame({"a": [1]}))
    with atomic_path(tmp_path / "folder", is_dir=True) as tmp:
        (tmp / "x").write_text("x")
    for path, mode in [("m.json", 0o644), ("t.csv", 0o644), ("folder", 0o755)]:
        assert stat.S_IMODE((tmp_path / path).stat().st_mode) == mode, path
    assert sorted(p.name for p in tmp_path.iterdir()) == ["folder", "m.json", "t.csv"]
