"""No message lost between processes (issue: group commit and scale): when one process cannot
publish to Redis while the others' subscriptions are fine, clients on the other processes still
get its messages within a few seconds, in id order, without reconnecting."""

import asyncio
import json
import secrets

import httpx
from websockets.asyncio.client import connect

from conftest import REDIS_URL, free_port, register_and_login, running_server, server_log, ws_url


async def receive_texts(ws, count, seconds):
    frames = []
    while len(frames) < count:
        frame = json.loads(await asyncio.wait_for(ws.recv(), seconds))
        if frame["type"] == "message":
            frames.append(frame)
    return frames


def signed_message(id, username, text):
    """What a process publishes for a batch of one message (signed with the tests' SECRET_KEY)."""
    import chat

    fields = {"id": id, "username": username, "text": text, "created_at": "2026-01-01T00:00:00Z", "type": "message"}
    return chat.signed(json.dumps({"type": "messages", "messages": [fields]}))


def test_messages_a_process_could_not_publish_reach_the_other_processes_in_order():
    channel = "chat-test-" + secrets.token_hex(4)
    env = {"BROADCAST_URL": REDIS_URL, "BROADCAST_CHANNEL": channel}
    refusing = f"redis://127.0.0.1:{free_port()}/0"  # nothing listens there
    with running_server(env=env) as (healthy, _), \
            running_server(env={**env, "CHAT_TEST_PUBLISH_URL": refusing}) as (cut_off, cut_off_process):
        with httpx.Client(base_url=healthy) as http:
            _, reader = register_and_login(http)
            _, writer = register_and_login(http)

        async def scenario():
            async with connect(ws_url(healthy, reader["access_token"], format="json")) as listener, \
                    connect(ws_url(cut_off, writer["access_token"], format="json")) as sender:
                texts = [f"unpublished {n}" for n in range(5)]
                for text in texts:
                    await sender.send(text)
                own = await receive_texts(sender, 5, 10)  # the cut-off process still serves its own clients
                assert [frame["text"] for frame in own] == texts
                # Nothing else is sent: only the relay's quiet-spell check can find these.
                heard = await receive_texts(listener, 5, 10)
                assert [frame["text"] for frame in heard] == texts
                assert [frame["id"] for frame in heard] == sorted(frame["id"] for frame in heard)
                # A gap revealed by a later message: fetched and delivered before it, in order.
                await sender.send("unpublished again")
                await receive_texts(sender, 1, 10)
                async with connect(ws_url(healthy, writer["access_token"], format="json")) as healthy_sender:
                    await healthy_sender.send("published")
                    heard = await receive_texts(listener, 2, 10)
                assert [frame["text"] for frame in heard] == ["unpublished again", "published"]
                assert heard[0]["id"] < heard[1]["id"]

        asyncio.run(scenario())
        assert "could not publish messages" in server_log(cut_off_process)


def test_batches_that_reach_redis_out_of_order_are_delivered_in_id_order():
    """Processes publish after they commit, so two batches can reach Redis in the other order
    than their ids. A relay holds the later one for the earlier to come (up to
    chat.REORDER_SECONDS), instead of asking the database at once, which has nothing yet
    between them and would have let the earlier one be skipped when it came."""
    import redis

    channel = "chat-test-" + secrets.token_hex(4)
    with running_server(env={"BROADCAST_URL": REDIS_URL, "BROADCAST_CHANNEL": channel}) as (url, _):
        with httpx.Client(base_url=url) as http:
            name, tokens = register_and_login(http)

        async def scenario():
            async with connect(ws_url(url, tokens["access_token"], format="json")) as ws:
                await ws.send("stored")
                last = (await receive_texts(ws, 1, 10))[0]["id"]
                publisher = redis.Redis.from_url(REDIS_URL)
                try:  # what a relay hears: the later batch first, then (within milliseconds) the earlier one
                    assert publisher.publish(channel, signed_message(last + 2, name, "published second")) == 1
                    assert publisher.publish(channel, signed_message(last + 1, name, "published first")) == 1
                finally:
                    publisher.close()
                heard = await receive_texts(ws, 2, 10)
                assert [(frame["id"], frame["text"]) for frame in heard] == [
                    (last + 1, "published first"), (last + 2, "published second")]

        asyncio.run(scenario())


def test_a_message_and_a_leave_heard_together_reach_presence_subscribers_in_that_order():
    """A relay delivers what it heard at once together; a leave heard just after a message still
    reaches a presence subscriber after that message, as it was published."""
    import redis

    import chat

    channel = "chat-test-" + secrets.token_hex(4)
    with running_server(env={"BROADCAST_URL": REDIS_URL, "BROADCAST_CHANNEL": channel}) as (url, _):
        with httpx.Client(base_url=url) as http:
            name, tokens = register_and_login(http)
        leaving = "gone_" + secrets.token_hex(3)

        async def scenario():
            async with connect(ws_url(url, tokens["access_token"], format="json", presence=1)) as ws:
                await ws.send("stored")
                last = (await receive_texts(ws, 1, 10))[0]["id"]
                publisher = redis.Redis.from_url(REDIS_URL)
                try:
                    with publisher.pipeline(transaction=False) as pipe:  # one write: heard at once
                        pipe.publish(channel, signed_message(last + 1, name, "goodbye"))
                        pipe.publish(channel, chat.signed(json.dumps(
                            {"type": "presence", "username": leaving, "online": False})))
                        assert pipe.execute() == [1, 1]
                finally:
                    publisher.close()
                frames = []
                while len(frames) < 2:
                    frame = json.loads(await asyncio.wait_for(ws.recv(), 10))
                    if frame.get("username") in (name, leaving):
                        frames.append((frame["type"], frame["username"]))
                assert frames == [("message", name), ("presence", leaving)]

        asyncio.run(scenario())
