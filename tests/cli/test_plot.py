"""`hpcattn plot`: the PNGs are real images of the requested size; mask densities are right."""
import json

import numpy as np
import pytest

from hpcattn.commands.cli import main
from hpcattn.masks import parse
from hpcattn.commands.plot import block_density, plot_results

matplotlib_image = pytest.importorskip("matplotlib.image", reason="matplotlib is not installed (pip install '.[plot]')")


def png(path):
    """(width, height, pixels) of a PNG, read back from disk."""
    with open(path, "rb") as f:
        assert f.read(8) == b"\x89PNG\r\n\x1a\n"
    img = matplotlib_image.imread(path)
    return img.shape[1], img.shape[0], img


def records():
    out = []
    for variant, comm in (("ring", 1.0), ("burst", 0.6)):
        for p in (1, 2, 4, 8):
            out.append({"job": "s", "scaling": "strong", "variant": variant, "mask": "causal", "seq": 4096,
                        "ranks": p, "wall_s": 8.0 / p + 0.1 * p, "bytes_sent": comm * (p - 1) * 2**20,
                        "useful_gflops": 1.0})
    for n in (1024, 4096, 16384):
        out.append({"variant": "ring", "mask": "window:256", "ranks": 1, "seq": n,
                    "useful_gflops": n / 1000, "wall_s": 1.0, "bytes_sent": 0})
    return out


def test_results_figure_has_every_panel_and_the_requested_size(tmp_path):
    res = tmp_path / "r.json"
    res.write_text(json.dumps({"records": records()}))
    assert main(["plot", str(res), "-o", str(tmp_path / "f.png")]) == 0
    w, h, img = png(tmp_path / "f.png")
    assert (w, h) == (1600, 1000) and img[..., :3].std() > 0.05
    titles = plot_results([res], tmp_path / "g.png", width=900, height=700)
    assert titles == ["time vs ranks", "parallel efficiency vs ranks", "bytes per rank by variant",
                      "useful GFLOP/s vs sequence length"]
    assert png(tmp_path / "g.png")[:2] == (900, 700)


def test_a_bare_list_of_records_and_several_files(tmp_path):
    a, b = tmp_path / "a.json", tmp_path / "b.json"
    a.write_text(json.dumps(records()[:4]))
    b.write_text(json.dumps({"records": records()[4:8]}))
    titles = plot_results([a, b], tmp_path / "f.png")
    assert "parallel efficiency vs ranks" in titles and "bytes per rank by variant" in titles


@pytest.mark.parametrize("content, words", [("not json", "is not JSON"), ('{"x": 1}', "no list of records"),
                                            ("[]", "no records"), ('[{"foo": 1}]', "nothing to plot")])
def test_bad_results_files_fail_with_one_line(tmp_path, capsys, content, words):
    res = tmp_path / "r.json"
    res.write_text(content)
    assert main(["plot", str(res), "-o", str(tmp_path / "f.png")]) == 1
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and words in err[0]
    assert not (tmp_path / "f.png").exists()


def test_mask_picture(tmp_path, capsys):
    out = tmp_path / "m.png"
    assert main(["plot", "--mask", "causal+window:300+global:50", "--seq", "100000", "-o", str(out)]) == 0
    assert "of pairs allowed" in capsys.readouterr().out
    w, h, img = png(out)
    assert (w, h) == (1000, 1000) and img[..., :3].std() > 0.05
    assert main(["plot", "--mask", "block:7", "--seq", "100", "-o", str(out), "--width", "640",
                 "--height", "480"]) == 0
    assert png(out)[:2] == (640, 480)
    assert main(["plot", "--mask", "nonsense:1", "--seq", "100", "-o", str(out)]) == 1
    assert main(["plot", "--mask", "full", "-o", str(out)]) == 1


@pytest.mark.parametrize("spec", ["full", "causal", "window:10", "causal+window:7", "dilated:3:4",
                                  "block:13", "global:5+window:2", "causal+block:9+global:3"])
def test_block_density_matches_the_dense_mask(spec):
    """Every row sampled (rows_per_block >= block height): exact; sampled rows: close."""
    n, blocks = 300, 30
    mask = parse(spec)
    i = np.arange(n)
    dense = mask.allowed(i[:, None], i[None, :]).astype(float)
    exact = dense.reshape(blocks, n // blocks, blocks, n // blocks).mean(axis=(1, 3))
    got, edges = block_density(mask, n, blocks=blocks, rows_per_block=n // blocks)
    assert edges.tolist() == list(range(0, n + 1, n // blocks))
    np.testing.assert_allclose(got, exact, atol=1e-12)
    sampled, _ = block_density(mask, n, blocks=blocks, rows_per_block=4)
    assert abs(sampled.mean() - dense.mean()) < 0.05 * dense.mean() + 0.01
