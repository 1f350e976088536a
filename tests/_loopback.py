"""An in-process Flower grid for the tests: every message goes to a ClientApp in this process."""

import uuid

from flwr.app import Context, Error, Message, RecordDict
from flwr.serverapp import Grid


class LoopbackGrid(Grid):
    """Delivers each message to the ClientApp of its node, in this process, and logs it."""

    def __init__(self, client_app, n_nodes: int = 0, node_configs=None, run_config=None) -> None:
        self.client_app = client_app
        if node_configs is None:
            node_configs = [{"partition-id": i, "num-partitions": n_nodes} for i in range(n_nodes)]
        self.contexts = {
            100 + i: Context(
                run_id=1,
                node_id=100 + i,
                node_config=dict(node_config),
                state=RecordDict(),
                run_config=dict(run_config or {}),
            )
            for i, node_config in enumerate(node_configs)
        }
        self.sent: list[Message] = []
        self.replies: list[Message] = []

    def set_run(self, run) -> None:  # pragma: no cover - unused
        pass

    @property
    def run(self):  # pragma: no cover - unused
        return None

    def create_message(
        self, content, message_type, dst_node_id, group_id, ttl=None
    ):  # pragma: no cover
        return Message(content, dst_node_id, message_type, group_id=group_id)

    def get_node_ids(self):
        return list(self.contexts)

    def push_messages(self, messages):
        raise NotImplementedError

    def pull_messages(self, message_ids):
        raise NotImplementedError

    def send_and_receive(self, messages, *, timeout=None):
        out = []
        for message in messages:
            message.metadata.__dict__["_message_id"] = uuid.uuid4().hex
            self.sent.append(message)
            try:
                reply = self.client_app(message, self.contexts[message.metadata.dst_node_id])
            except Exception as err:  # noqa: BLE001 - as Flower's runtime does: an error reply
                reply = Message(
                    Error(code=0, reason=f"{type(err).__name__}: {err}"), reply_to=message
                )
            self.replies.append(reply)
            out.append(reply)
        return out
