"""The RESP2 connection (service/broker/resp.py): how it opens, authenticates and names itself against
a real redis-server, and how it sorts what it reads into replies and pushes (fed bytes directly:
pure parsing logic)."""

from __future__ import annotations

import asyncio
import secrets
import ssl
from collections.abc import AsyncIterator

import pytest

from service.broker.resp import Address, ConnectionLost, ConnectOptions, Push, ReplyError, RespConnection
from service.broker.topology import tls_context
from service.config import Settings
from tests.redis_servers import RedisServer
from tests.test_redis_tls import Pki, tls_redis  # noqa: F401 (the fixture)

OPTIONS = ConnectOptions(timeout=2.0)


def address(server: RedisServer) -> Address:
    return Address("127.0.0.1", server.port)


async def client_info(conn: RespConnection) -> dict[str, str]:
    reply: bytes = await conn.call(b"CLIENT", b"INFO", timeout=2)
    return dict(field.split("=", 1) for field in reply.decode().split())


# --- opening a connection to a real redis-server ------------------------------------------------


@pytest.mark.integration
async def test_a_named_connection_selects_its_database(redis_server: RedisServer) -> None:
    conn = await RespConnection.open(
        address(redis_server), ConnectOptions(db=3, timeout=2.0), name="relay-pod-a"
    )
    try:
        info = await client_info(conn)
        assert info["name"] == "relay-pod-a"
        assert info["db"] == "3"
        assert await conn.call(b"PING", timeout=2) == b"PONG"
    finally:
        conn.close()
        await conn.wait_closed()


@pytest.mark.integration
async def test_select_db_false_stays_on_database_0(redis_server: RedisServer) -> None:
    # Sentinels and cluster nodes have no SELECT: the topologies open with select_db=False.
    conn = await RespConnection.open(
        address(redis_server), ConnectOptions(db=3, timeout=2.0), select_db=False
    )
    try:
        info = await client_info(conn)
        assert info["db"] == "0"
        assert info["name"] == ""
    finally:
        conn.close()
        await conn.wait_closed()


@pytest.fixture
async def acl_user(redis_server: RedisServer) -> AsyncIterator[tuple[str, str]]:
    user, password = "relay-" + secrets.token_hex(4), secrets.token_hex(8)
    redis_server.call("ACL", "SETUSER", user, "on", ">" + password, "+@all", "~*", "&*")
    yield user, password
    redis_server.call("ACL", "DELUSER", user)


@pytest.mark.integration
async def test_a_username_and_password_log_in_as_that_user(
    redis_server: RedisServer, acl_user: tuple[str, str]
) -> None:
    user, password = acl_user
    conn = await RespConnection.open(
        address(redis_server), ConnectOptions(username=user, password=password, timeout=2.0)
    )
    try:
        assert await conn.call(b"ACL", b"WHOAMI", timeout=2) == user.encode()
    finally:
        conn.close()
        await conn.wait_closed()


@pytest.mark.integration
async def test_a_wrong_password_fails_the_open_with_redis_error_and_closes_the_socket(
    redis_server: RedisServer, acl_user: tuple[str, str]
) -> None:
    user, _ = acl_user
    before = int(redis_server.info("clients")["connected_clients"])
    with pytest.raises(ReplyError, match="WRONGPASS"):
        await RespConnection.open(
            address(redis_server), ConnectOptions(username=user, password="no", timeout=2.0)
        )
    # A password without a username is the default user's: this server has none, and says so.
    with pytest.raises(ReplyError, match="AUTH"):
        await RespConnection.open(address(redis_server), ConnectOptions(password="secret", timeout=2.0))
    for _ in range(100):  # the refused connections are closed, not left open on the server
        if int(redis_server.info("clients")["connected_clients"]) <= before:
            break
        await asyncio.sleep(0.02)
    assert int(redis_server.info("clients")["connected_clients"]) <= before


async def test_a_server_that_never_answers_times_the_open_out_and_is_hung_up_on() -> None:
    accepted: list[tuple[asyncio.StreamReader, asyncio.StreamWriter]] = []

    async def silent(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        accepted.append((reader, writer))

    server = await asyncio.start_server(silent, "127.0.0.1", 0)
    port = server.sockets[0].getsockname()[1]
    try:
        loop = asyncio.get_running_loop()
        started = loop.time()
        with pytest.raises(TimeoutError):
            await RespConnection.open(Address("127.0.0.1", port), ConnectOptions(password="x", timeout=0.3))
        assert loop.time() - started < 2.0
        ((reader, _),) = accepted
        sent = await asyncio.wait_for(reader.read(), 2.0)  # returns at EOF: relay closed its end
        assert sent == b"*2\r\n$4\r\nAUTH\r\n$1\r\nx\r\n"
    finally:
        for _, writer in accepted:
            writer.close()
        server.close()
        await server.wait_closed()


async def test_a_refused_connection_raises_oserror() -> None:
    server = await asyncio.start_server(lambda r, w: None, "127.0.0.1", 0)
    port = server.sockets[0].getsockname()[1]
    server.close()
    await server.wait_closed()
    with pytest.raises(OSError):
        await RespConnection.open(Address("127.0.0.1", port), OPTIONS)


@pytest.mark.integration
async def test_it_connects_to_the_host_it_is_given(redis_server: RedisServer) -> None:
    # redis_server listens on 127.0.0.1 only: another loopback address on its port is refused.
    with pytest.raises(OSError):
        await RespConnection.open(Address("127.0.0.2", redis_server.port), OPTIONS)


@pytest.mark.integration
async def test_tls_is_spoken_and_the_server_is_verified_by_name(request: pytest.FixtureRequest) -> None:
    served: tuple[RedisServer, int, Pki] = request.getfixturevalue("tls_redis")  # tests/test_redis_tls.py
    _, port, pki = served
    settings = Settings(
        redis_tls_ca_file=str(pki.ca),
        redis_tls_cert_file=str(pki.client_cert),
        redis_tls_key_file=str(pki.client_key),
    )
    options = ConnectOptions(tls=tls_context(settings), timeout=2.0)
    conn = await RespConnection.open(Address("localhost", port), options)
    try:
        assert await conn.call(b"PING", timeout=2) == b"PONG"
    finally:
        conn.close()
        await conn.wait_closed()


# --- what is logged and shown -------------------------------------------------------------------


def test_options_never_show_the_password() -> None:
    options = ConnectOptions(username="relay", password="hunter2-secret", db=2, timeout=1.5)
    assert repr(options) == "ConnectOptions(db=2, tls=False, timeout=1.5)"
    tls = ConnectOptions(password="hunter2-secret", tls=ssl.create_default_context())
    assert repr(tls) == "ConnectOptions(db=0, tls=True, timeout=3.0)"
    assert "hunter2" not in str(options) + str(tls)


@pytest.mark.parametrize(
    ("host", "text"),
    [("10.0.0.7", "10.0.0.7:6379"), ("redis-0.redis", "redis-0.redis:6379"), ("::1", "[::1]:6379")],
)
def test_an_address_reads_as_host_and_port(host: str, text: str) -> None:
    assert str(Address(host, 6379)) == text


# --- sorting what is read: fed bytes, no socket ---------------------------------------------------


class Recorder:
    def __init__(self) -> None:
        self.pushes: list[list[Push]] = []
        self.lost: list[str] = []

    def push(self, pushes: list[Push]) -> None:
        self.pushes.append(pushes)

    def on_lost(self, reason: str) -> None:
        self.lost.append(reason)


class FakeTransport(asyncio.Transport):
    def __init__(self) -> None:
        super().__init__()
        self.written: list[bytes] = []
        self.aborted = False

    def write(self, data: bytes | bytearray | memoryview) -> None:
        self.written.append(bytes(data))

    def abort(self) -> None:
        self.aborted = True

    def is_closing(self) -> bool:
        return self.aborted


def connected(pubsub: bool = True) -> tuple[RespConnection, Recorder, FakeTransport]:
    recorder = Recorder()
    conn = RespConnection(recorder.push if pubsub else None, recorder.on_lost)
    transport = FakeTransport()
    conn.connection_made(transport)
    return conn, recorder, transport


async def test_commands_of_one_turn_leave_in_one_write_and_replies_come_back_in_order() -> None:
    conn, _, transport = connected(pubsub=False)
    first, second = conn.send(b"GET", b"a"), conn.send(b"INCR", "b")
    conn.write(b"SUBSCRIBE", b"c")
    assert transport.written == []
    assert conn.oldest_pending() is not None
    await asyncio.sleep(0)
    assert transport.written == [
        b"*2\r\n$3\r\nGET\r\n$1\r\na\r\n*2\r\n$4\r\nINCR\r\n$1\r\nb\r\n*2\r\n$9\r\nSUBSCRIBE\r\n$1\r\nc\r\n"
    ]
    conn.data_received(b"$1\r\nx")
    assert not first.done()  # a reply split across reads waits for the rest
    conn.data_received(b"\r\n:7\r\n")
    assert first.result() == b"x"
    assert second.result() == 7
    assert conn.oldest_pending() is None


async def test_an_error_reply_fails_only_its_own_command() -> None:
    conn, _, _ = connected(pubsub=False)
    first, second = conn.send(b"EVALSHA", b"x"), conn.send(b"PING")
    conn.data_received(b"-NOSCRIPT No matching script\r\n+PONG\r\n")
    with pytest.raises(ReplyError, match="NOSCRIPT No matching script"):
        first.result()
    assert second.result() == b"PONG"


async def test_a_reply_for_a_caller_that_gave_up_is_skipped_not_handed_to_the_next() -> None:
    conn, _, _ = connected(pubsub=False)
    first, second = conn.send(b"GET", b"a"), conn.send(b"GET", b"b")
    first.cancel()
    conn.data_received(b"$1\r\na\r\n$1\r\nb\r\n")
    assert second.result() == b"b"


async def test_pushes_go_to_on_push_in_one_batch_and_replies_to_their_callers() -> None:
    conn, recorder, _ = connected()
    ping = conn.send(b"PING")
    conn.data_received(
        b"*3\r\n$9\r\nsubscribe\r\n$1\r\na\r\n:1\r\n"
        b"*3\r\n$7\r\nmessage\r\n$1\r\na\r\n$2\r\nhi\r\n"
        b"+PONG\r\n"
        b"*3\r\n$8\r\nsmessage\r\n$1\r\n{\r\n$2\r\nyo\r\n"
    )
    assert ping.result() == b"PONG"
    assert recorder.pushes == [
        [[b"subscribe", b"a", 1], [b"message", b"a", b"hi"], [b"smessage", b"{", b"yo"]]
    ]


async def test_a_list_reply_that_is_not_a_push_goes_to_its_caller() -> None:
    conn, recorder, _ = connected()
    slots = conn.send(b"CLUSTER", b"SLOTS")
    empty = conn.send(b"CLUSTER", b"SLOTS")
    conn.data_received(b"*2\r\n$3\r\nfoo\r\n$3\r\nbar\r\n*0\r\n")
    assert slots.result() == [b"foo", b"bar"]
    assert empty.result() == []
    assert recorder.pushes == []


async def test_an_error_nobody_waits_for_is_a_push_on_a_pubsub_connection() -> None:
    # A refused SSUBSCRIBE (MOVED, CROSSSLOT) answers no command: it must reach the broker.
    conn, recorder, _ = connected()
    conn.data_received(b"-MOVED 3999 127.0.0.1:7001\r\n")
    assert len(recorder.pushes) == 1
    (error,) = recorder.pushes[0]
    assert isinstance(error, ReplyError)
    assert str(error) == "MOVED 3999 127.0.0.1:7001"
    assert not conn.closed


async def test_without_on_push_nothing_is_a_push() -> None:
    conn, recorder, _ = connected(pubsub=False)
    reply = conn.send(b"X")
    conn.data_received(b"*3\r\n$7\r\nmessage\r\n$1\r\na\r\n$2\r\nhi\r\n")
    assert reply.result() == [b"message", b"a", b"hi"]
    conn.data_received(b"-ERR stray\r\n")  # nobody to tell: dropped, the connection goes on
    assert not conn.closed
    assert recorder.pushes == []


async def test_bytes_that_are_not_resp_drop_the_connection_as_a_protocol_error() -> None:
    conn, recorder, transport = connected()
    pending = conn.send(b"PING")
    conn.data_received(b"!not resp\r\n")
    assert transport.aborted
    assert conn.closed
    with pytest.raises(ConnectionLost, match=r"^protocol error: "):
        pending.result()
    assert conn.lost_reason == "protocol_error"
    conn.connection_lost(None)  # what the transport does after abort()
    assert recorder.lost == ["protocol_error"]
    assert recorder.pushes == []


async def test_losing_the_connection_fails_what_is_in_flight_and_reports_why() -> None:
    conn, recorder, _ = connected()
    pending = conn.send(b"PING")
    conn.connection_lost(ConnectionResetError("reset by peer"))
    with pytest.raises(ConnectionLost, match=r"^reset by peer$"):
        pending.result()
    assert recorder.lost == ["connection_lost"]
    await asyncio.wait_for(conn.wait_closed(), 1)
    with pytest.raises(ConnectionLost):
        conn.send(b"PING").result()  # a closed connection refuses at once


async def test_redis_closing_the_connection_is_reported_as_such() -> None:
    conn, recorder, _ = connected()
    pending = conn.send(b"PING")
    conn.connection_lost(None)
    with pytest.raises(ConnectionLost) as lost:
        pending.result()
    assert str(lost.value) == "connection closed by Redis"
    assert recorder.lost == ["connection_lost"]


async def test_closing_it_ourselves_fails_what_is_in_flight_without_reporting_it_lost() -> None:
    conn, recorder, transport = connected()
    pending = conn.send(b"PING")
    conn.write(b"SUBSCRIBE", b"a")
    conn.close()
    assert transport.aborted
    with pytest.raises(ConnectionLost) as lost:
        pending.result()
    assert str(lost.value) == "connection closed"
    with pytest.raises(ConnectionLost) as refused:  # after close: refused at once, saying why
        conn.send(b"PING").result()
    assert str(refused.value) == "connection closed"
    conn.write(b"PING")  # after close: dropped, never written
    await asyncio.sleep(0)
    assert transport.written == []
    conn.connection_lost(None)
    assert recorder.lost == []
    await asyncio.wait_for(conn.wait_closed(), 1)
