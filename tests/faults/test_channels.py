"""Channels are built by apprise from the whole config file on every pass: an e-mail keeps its from= and to=, and the
YAML `asset:` applies (a channel rebuilt from its URL alone would send a PI's signing code to the relay's own mailbox)."""

from __future__ import annotations

from tasks.delivery import load_channels

YAML = """version: 1
asset:
  app_id: NK Trial
urls:
  - mailtos://relay:pw@site.org?from=pi-01@site.org:
      - tag: pi
  - mailtos://relay:pw@site.org?from=trial@site.org&to=a@x.org,b@x.org:
      - tag: nurse
  - json://127.0.0.1:9/coordinator:
      - tag: coordinator
"""


def test_email_channels_keep_their_sender_recipients_and_asset_on_every_pass(tmp_path):
    cfg = tmp_path / "apprise.yml"
    cfg.write_text(YAML, encoding="utf-8")
    for _ in range(2):  # the second pass uses the check kept for this text, and new plugins
        by_tag = {next(iter(c.tags)): c.server for c in load_channels(cfg)}
        assert by_tag["pi"].targets == [(False, "pi-01@site.org")] and by_tag["pi"].from_addr[1] == "pi-01@site.org"
        assert by_tag["nurse"].from_addr[1] == "trial@site.org"
        assert by_tag["nurse"].targets == [(False, "a@x.org"), (False, "b@x.org")]
        assert {s.asset.app_id for s in by_tag.values()} == {"NK Trial"}
    first, second = load_channels(cfg), load_channels(cfg)
    assert all(a.server is not b.server for a, b in zip(first, second))  # no plugin (nor its throttle) outlives a pass


def test_a_text_config_keeps_the_email_sender_and_a_fixed_file_is_read_at_once(tmp_path):
    cfg = tmp_path / "apprise.txt"
    cfg.write_text("pi=mailtos://relay:pw@site.org?from=pi-01@site.org\n", encoding="utf-8")
    (pi,) = load_channels(cfg)
    assert pi.tags == {"pi"} and pi.server.targets == [(False, "pi-01@site.org")]
    cfg.write_text("pi=mailtos://relay:pw@site.org?from=pi-02@site.org\n", encoding="utf-8")
    (pi,) = load_channels(cfg)
    assert pi.server.targets == [(False, "pi-02@site.org")]


def test_a_channel_apprise_cannot_copy_is_built_anew_and_the_others_still_load(tmp_path, capfd):
    """A Matrix channel holds a lock: the pass takes it from a new parse, and the e-mail and JSON channels beside it load."""
    cfg = tmp_path / "apprise.yml"
    cfg.write_text(YAML + "  - matrixs://bot:pw@matrix.site.org/#trial-safety:\n      - tag: safety\n", encoding="utf-8")
    first, second = load_channels(cfg), load_channels(cfg)
    assert sorted(next(iter(c.tags)) for c in first) == ["coordinator", "nurse", "pi", "safety"]
    assert all(a.server is not b.server for a, b in zip(first, second))
    assert type(next(c for c in second if "safety" in c.tags).server).__name__ == "NotifyMatrix"
    assert "Traceback" not in capfd.readouterr().err  # no half-copied plugin complaining as it is collected
