"""tracking_sender.Sender's bounded queue: while the server is away, the oldest items give way."""
import logging

from raytimm.tracking_sender import Sender


class RecordingSink:
    """A Sink that records what reaches it (an empty server)."""

    def __init__(self):
        self.steps, self.files = [], []

    def sync(self):
        return {}, set()

    def send_params(self, params):
        pass

    def send_tags(self, tags):
        pass

    def send_metrics(self, metrics):
        self.steps += [step for _key, _value, _ts, step in metrics]

    def send_file(self, kind, payload, target):
        self.files.append(payload)

    def send_status(self, status):
        pass


def test_a_full_queue_drops_the_oldest_items_says_so_and_removes_their_staged_copies(tmp_path, caplog):
    sink = RecordingSink()
    sender = Sender(sink, where="http://mlflow.test", cooldown_s=0.0, describe=str, max_metrics=3, max_files=1)
    staged = [tmp_path / "staged-1", tmp_path / "staged-2"]
    for folder in staged:
        folder.mkdir()
    # Queued before the thread runs: what piles up while the server cannot be reached.
    for step in range(1, 6):
        sender.add_metrics({"val/top1": float(step)}, step)
    sender.add_file("text", "first", "a.txt", cleanup=str(staged[0]))
    sender.add_file("text", "second", "b.txt", cleanup=str(staged[1]))
    assert not staged[0].exists() and staged[1].exists()  # the dropped file's staged copy is gone at once
    with caplog.at_level(logging.WARNING, logger="raytimm"):
        sender.start()
        assert sender.flush(idle_timeout_s=30)
    sender.stop()
    assert sorted(sink.steps) == [3, 4, 5] and sink.files == ["second"]
    assert any("3 queued item(s) were dropped" in r.getMessage() for r in caplog.records)
