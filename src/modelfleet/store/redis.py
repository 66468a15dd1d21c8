"""Redis store: redis://host:port/db?prefix=P (prefix defaults to "modelfleet").

How the contract in base.py is kept here:

- Clock (principle 4): Redis ``TIME``, read inside the same Lua script or MULTI block as the
  data it is compared with; heartbeat ages are computed against it on read.
- Atomic writes (principle 5): every write is one Lua script (Redis runs a script without
  interleaving any other command), so a heartbeat, its instance changes and the revision bump
  land together or not at all. A heartbeat is one EVALSHA: one round trip.
- Reads that need a consistent view (workers + their ages) are one MULTI/EXEC block.

Keys, all under ``P:`` (the scripts build key names from the prefix, so this store needs a
single Redis, not Redis Cluster):

  P:schema            schema version (migrate() writes it, ping() checks it; every write script
                      refuses to run without it, so nothing is written into a Redis that lost
                      its state before a controller notices)
  P:meta              hash  cluster_id (written once, by the migrate() that creates it), auth
                      ("required" | "opened"), replaces (comma-separated cluster ids)
  P:rev               routing revision (INCR); starts at the time in ms with the identity
  P:paused / P:paused_until   seconds the store took no heartbeat / store time counted up to
  P:workers           hash  worker id -> WorkerInfo JSON
  P:wreg              hash  worker id -> registered_at (HSETNX: the registration test)
  P:whb               zset  worker id scored by last_heartbeat (store time)
  P:wlive             zset  worker id scored by the liveness clock at its last heartbeat
                      (store time - paused): ages and the dead-worker GC range use it
  P:inst              hash  instance id -> Instance JSON ("params" nested as a JSON string,
                      "updated_at" as a string, so Lua's cjson never re-encodes either)
  P:byworker:<wid>    set   ids of the instances whose worker_id is <wid>
  P:deps / depc / depu  hashes  deployment name -> body JSON / created_at / updated_at
  P:depe              hash  deployment name -> why the reconciler cannot act on it (absent: fine)
  P:depa              hash  deployment name -> {"replicas", "autoscale_status"} JSON, the
                      autoscaler's write, laid over the body on read (so the body is never
                      re-encoded by Lua's cjson); a put or delete of the deployment drops it
  P:load              hash  gateway source -> load report JSON
  P:loadexp           zset  gateway source scored by the store time its report expires at
                      (Redis TIME + ttl): read takes scores above TIME, writes drop the rest
  P:lease:<name>      hash  holder, token, exp (never expires in Redis: the token must survive)
  P:keys / keyc       hashes  api key id -> {id, name, secret_hash} JSON / created_at
  P:keyrev            set   revoked api key ids
"""

from __future__ import annotations

import socket
import uuid
from collections.abc import Awaitable, Callable
from typing import Any
from urllib.parse import parse_qsl, urlencode, urlsplit, urlunsplit

import orjson
import redis.asyncio as aioredis
from redis import exceptions as rexc
from redis.asyncio.retry import Retry
from redis.backoff import NoBackoff

from modelfleet.models import (
    ApiKey,
    AutoscaleStatus,
    Deployment,
    Instance,
    InstanceSpec,
    InstanceState,
    InstanceStatus,
    Lease,
    LoadReport,
    WorkerInfo,
    WorkerRecord,
)
from modelfleet.store import describe_url
from modelfleet.store.base import (
    SPEC_FIELDS,
    ClusterMeta,
    HeartbeatResult,
    Persistence,
    Store,
    StoreConfigError,
    StoreError,
    StoreUnavailable,
)

SCHEMA_VERSION = "2"

# Shared by every script: the server clock, and a fixed-point rendering of it (Lua numbers
# returned to the client are truncated to integers; cjson keeps only 14 digits).
_LUA_CORE = """
local P = ARGV[1]
local function now()
  local t = redis.call('TIME')
  return tonumber(t[1]) + tonumber(t[2]) / 1000000
end
local function fmt(x) return string.format('%.6f', x) end
local function is_null(v) return v == nil or v == cjson.null end
-- Delete the instances <wid> declared itself (deployment null); assigned ones stay.
local function delete_declared(wid, keep)
  local idx = P .. ':byworker:' .. wid
  for _, iid in ipairs(redis.call('SMEMBERS', idx)) do
    if not (keep and keep[iid]) then
      local raw = redis.call('HGET', P .. ':inst', iid)
      if not raw then
        redis.call('SREM', idx, iid)
      elseif is_null(cjson.decode(raw).deployment) then
        redis.call('HDEL', P .. ':inst', iid)
        redis.call('SREM', idx, iid)
      end
    end
  end
end
local function forget_worker(wid)
  if redis.call('HDEL', P .. ':workers', wid) == 0 then return false end
  redis.call('HDEL', P .. ':wreg', wid)
  redis.call('ZREM', P .. ':whb', wid)
  redis.call('ZREM', P .. ':wlive', wid)
  delete_declared(wid, nil)
  return true
end
local function paused() return tonumber(redis.call('GET', P .. ':paused') or '0') end
"""
NO_SCHEMA = "MFNOSCHEMA"
# Every write script but migrate's: a Redis that lost its state (restarted without persistence)
# has no schema key, and nothing may be written into it until an operator accepts it.
_LUA_HEAD = _LUA_CORE + f"""
if redis.call('EXISTS', P .. ':schema') == 0 then
  return redis.error_reply('{NO_SCHEMA} no modelfleet schema under this prefix (the store lost its state?)')
end
"""

# Schema, identity and the first revision. The identity and the time-in-ms revision are
# written only by the migrate() that finds no identity: once per store lifetime.
_MIGRATE = """
redis.call('SET', P .. ':schema', ARGV[3])
if redis.call('HSETNX', P .. ':meta', 'cluster_id', ARGV[2]) == 1 then
  if redis.call('HLEN', P .. ':keys') > 0 then redis.call('HSET', P .. ':meta', 'auth', 'required') end
  local t = redis.call('TIME')
  local ms = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
  if tonumber(redis.call('GET', P .. ':rev') or '0') < ms then
    redis.call('SET', P .. ':rev', string.format('%d', ms))
  end
end
-- Layout 1 had no liveness clock: nothing was paused, so it equals the heartbeat time.
if redis.call('EXISTS', P .. ':wlive') == 0 then
  local hb = redis.call('ZRANGE', P .. ':whb', 0, -1, 'WITHSCORES')
  for i = 1, #hb, 2 do redis.call('ZADD', P .. ':wlive', hb[i + 1], hb[i]) end
end
return 1
"""

_RECORD_OUTAGE = """
local t = now()
local until_ = tonumber(redis.call('GET', P .. ':paused_until') or '0')
local latest = redis.call('ZREVRANGE', P .. ':whb', 0, 0, 'WITHSCORES')
local from = t
if latest[2] then from = tonumber(latest[2]) end
if until_ > from then from = until_ end
local added = math.max(0, t - from)
redis.call('SET', P .. ':paused', fmt(paused() + added))
redis.call('SET', P .. ':paused_until', fmt(math.max(until_, t)))
return fmt(added)
"""

_ADVANCE_REVISION = """
local rev = tonumber(redis.call('GET', P .. ':rev') or '0')
local want = tonumber(ARGV[2])
if rev < want then
  redis.call('SET', P .. ':rev', ARGV[2])
  return ARGV[2]
end
return tostring(redis.call('GET', P .. ':rev') or '0')
"""

_OPEN_INFERENCE = """
redis.call('HSET', P .. ':meta', 'auth', 'opened')
redis.call('INCR', P .. ':rev')
return 1
"""

_RECORD_ACCEPTED = """
local cur = redis.call('HGET', P .. ':meta', 'replaces') or ''
local found = false
for id in string.gmatch(cur, '[^,]+') do if id == ARGV[2] then found = true end end
if not found then
  if cur == '' then cur = ARGV[2] else cur = cur .. ',' .. ARGV[2] end
  redis.call('HSET', P .. ':meta', 'replaces', cur)
end
if ARGV[3] == '1' then redis.call('HSET', P .. ':meta', 'auth', 'required') end
redis.call('INCR', P .. ':rev')
return 1
"""

_HEARTBEAT = """
local wid = ARGV[2]
local t = now()
local ts = fmt(t)
local registered = redis.call('HSETNX', P .. ':wreg', wid, ts)
redis.call('HSET', P .. ':workers', wid, ARGV[3])
redis.call('ZADD', P .. ':whb', ts, wid)
redis.call('ZADD', P .. ':wlive', fmt(t - paused()), wid)
local rev = false
if registered == 1 then rev = redis.call('INCR', P .. ':rev') end
if ARGV[4] ~= '' then
  local reported = {}
  for _, st in ipairs(cjson.decode(ARGV[4])) do
    reported[st.id] = true
    local raw = redis.call('HGET', P .. ':inst', st.id)
    local inst = false
    if raw then
      inst = cjson.decode(raw)
    elseif st.new then
      -- A worker-declared instance seen for the first time (its status carries a model).
      inst = st.new
      redis.call('SADD', P .. ':byworker:' .. wid, st.id)
    end
    -- A report about an instance that has since moved to another worker changes nothing.
    if inst and inst.worker_id == wid then
      inst.state = st.state
      inst.endpoint = st.endpoint
      inst.restarts = st.restarts
      inst.last_error = st.last_error
      inst.updated_at = ts
      redis.call('HSET', P .. ':inst', st.id, cjson.encode(inst))
    end
  end
  delete_declared(wid, reported)
  rev = redis.call('INCR', P .. ':rev')
end
if not rev then rev = tonumber(redis.call('GET', P .. ':rev') or '0') end
return {registered, rev}
"""

_DELETE_WORKER = """
if not forget_worker(ARGV[2]) then return 0 end
redis.call('INCR', P .. ':rev')
return 1
"""

# The age test and the deletes run in one script: a heartbeat cannot land in between.
_DELETE_DEAD = """
local cutoff = now() - paused() - tonumber(ARGV[2])
local dead = redis.call('ZRANGEBYSCORE', P .. ':wlive', '-inf', '(' .. fmt(cutoff))
for _, wid in ipairs(dead) do
  forget_worker(wid)
  redis.call('INCR', P .. ':rev')
end
return dead
"""

_CREATE_INSTANCE = """
local id = ARGV[2]
if redis.call('HEXISTS', P .. ':inst', id) == 1 then return false end
local inst = cjson.decode(ARGV[3])
inst.updated_at = fmt(now())
local out = cjson.encode(inst)
redis.call('HSET', P .. ':inst', id, out)
if not is_null(inst.worker_id) then redis.call('SADD', P .. ':byworker:' .. inst.worker_id, id) end
redis.call('INCR', P .. ':rev')
return out
"""

_UPDATE_INSTANCE = """
local id = ARGV[2]
local raw = redis.call('HGET', P .. ':inst', id)
if not raw then return false end
local inst = cjson.decode(raw)
local patch = cjson.decode(ARGV[3])
if patch.worker_id ~= nil then
  if not is_null(inst.worker_id) then redis.call('SREM', P .. ':byworker:' .. inst.worker_id, id) end
  if not is_null(patch.worker_id) then redis.call('SADD', P .. ':byworker:' .. patch.worker_id, id) end
end
for k, v in pairs(patch) do inst[k] = v end
inst.updated_at = fmt(now())
local out = cjson.encode(inst)
redis.call('HSET', P .. ':inst', id, out)
redis.call('INCR', P .. ':rev')
return out
"""

_DELETE_INSTANCE = """
local id = ARGV[2]
local raw = redis.call('HGET', P .. ':inst', id)
if not raw then return 0 end
local inst = cjson.decode(raw)
if not is_null(inst.worker_id) then redis.call('SREM', P .. ':byworker:' .. inst.worker_id, id) end
redis.call('HDEL', P .. ':inst', id)
redis.call('INCR', P .. ':rev')
return 1
"""

_PUT_DEPLOYMENT = """
local name = ARGV[2]
local ts = fmt(now())
redis.call('HSETNX', P .. ':depc', name, ts)
redis.call('HSET', P .. ':depu', name, ts)
redis.call('HSET', P .. ':deps', name, ARGV[3])
redis.call('HDEL', P .. ':depe', name)
redis.call('HDEL', P .. ':depa', name)
redis.call('INCR', P .. ':rev')
return {redis.call('HGET', P .. ':depc', name), ts}
"""

_DELETE_DEPLOYMENT = """
local name = ARGV[2]
if redis.call('HDEL', P .. ':deps', name) == 0 then return 0 end
redis.call('HDEL', P .. ':depc', name)
redis.call('HDEL', P .. ':depu', name)
redis.call('HDEL', P .. ':depe', name)
redis.call('HDEL', P .. ':depa', name)
redis.call('INCR', P .. ':rev')
return 1
"""

_SET_DEPLOYMENT_SCALE = """
local name = ARGV[2]
if redis.call('HEXISTS', P .. ':deps', name) == 0 then return 0 end
redis.call('HSET', P .. ':depa', name, ARGV[3])
return 1
"""

_PUT_LOAD_REPORT = """
local t = now()
redis.call('HSET', P .. ':load', ARGV[2], ARGV[3])
redis.call('ZADD', P .. ':loadexp', t + tonumber(ARGV[4]), ARGV[2])
local gone = redis.call('ZRANGEBYSCORE', P .. ':loadexp', '-inf', t)
if #gone > 0 then
  redis.call('HDEL', P .. ':load', unpack(gone))
  redis.call('ZREMRANGEBYSCORE', P .. ':loadexp', '-inf', t)
end
return 1
"""

_LIST_LOAD_REPORTS = """
local t = now()
local live = redis.call('ZRANGEBYSCORE', P .. ':loadexp', '(' .. fmt(t), '+inf', 'WITHSCORES')
local out = {}
for i = 1, #live, 2 do
  local body = redis.call('HGET', P .. ':load', live[i])
  if body then
    out[#out + 1] = body
    out[#out + 1] = fmt(tonumber(live[i + 1]) - t)
  end
end
return out
"""

_SET_DEPLOYMENT_ERROR = """
local name = ARGV[2]
if redis.call('HEXISTS', P .. ':deps', name) == 0 then return 0 end
if ARGV[3] == '' then redis.call('HDEL', P .. ':depe', name) else redis.call('HSET', P .. ':depe', name, ARGV[3]) end
return 1
"""

# Same rules as memory.py: free (or expired) -> taken, token + 1; held by us and unexpired ->
# renewed, same token; held by someone else and unexpired -> refused.
_ACQUIRE_LEASE = """
local key = P .. ':lease:' .. ARGV[2]
local holder = ARGV[3]
local t = now()
local cur = redis.call('HMGET', key, 'holder', 'token', 'exp')
local token = 1
if cur[1] then
  local tok, exp = tonumber(cur[2]), tonumber(cur[3])
  if cur[1] == holder and exp > t then token = tok
  elseif exp <= t then token = tok + 1
  else return false end
end
redis.call('HSET', key, 'holder', holder, 'token', token, 'exp', fmt(t + tonumber(ARGV[4])))
return token
"""

_RELEASE_LEASE = """
local key = P .. ':lease:' .. ARGV[2]
if redis.call('HGET', key, 'holder') == ARGV[3] then
  redis.call('HSET', key, 'exp', fmt(now()))
end
return 1
"""

_GET_LEASE = """
local cur = redis.call('HMGET', P .. ':lease:' .. ARGV[2], 'holder', 'token', 'exp')
if not cur[1] then return false end
local left = tonumber(cur[3]) - now()
if left <= 0 then return false end
return {cur[1], cur[2], fmt(left)}
"""

_CREATE_KEY = """
local id = ARGV[2]
if redis.call('HEXISTS', P .. ':keys', id) == 1 then return false end
local ts = fmt(now())
redis.call('HSET', P .. ':keys', id, ARGV[3])
redis.call('HSET', P .. ':keyc', id, ts)
redis.call('HSET', P .. ':meta', 'auth', 'required')
if ARGV[4] == '1' then redis.call('SADD', P .. ':keyrev', id) end
redis.call('INCR', P .. ':rev')
return ts
"""

_REVOKE_KEY = """
local id = ARGV[2]
if redis.call('HEXISTS', P .. ':keys', id) == 0 then return 0 end
redis.call('SADD', P .. ':keyrev', id)
redis.call('INCR', P .. ':rev')
return 1
"""


def _parse_url(url: str) -> tuple[str, str]:
    """(URL for redis-py without our ``prefix`` parameter, prefix)."""
    parts = urlsplit(url)
    query = parse_qsl(parts.query, keep_blank_values=True)
    prefix = "modelfleet"
    rest = []
    for k, v in query:
        if k == "prefix":
            prefix = v
        else:
            rest.append((k, v))
    if not prefix or any(c.isspace() for c in prefix):
        raise StoreConfigError(f"{describe_url(url)}: prefix must be a non-empty word")
    return urlunsplit(parts._replace(query=urlencode(rest))), prefix


def _instance_doc(inst: Instance) -> dict[str, Any]:
    doc = inst.model_dump(mode="json")
    doc["params"] = orjson.dumps(inst.params).decode()
    doc["updated_at"] = f"{inst.updated_at:.6f}"
    return doc


def _instance(raw: str) -> Instance:
    doc = orjson.loads(raw)
    doc["params"] = orjson.loads(doc["params"])
    doc["updated_at"] = float(doc["updated_at"])
    return Instance.model_validate(doc)


class RedisStore(Store):
    url_scheme = "redis"

    def __init__(
        self,
        url: str,
        *,
        connect_timeout: float = 5.0,
        op_timeout: float = 15.0,
        max_connections: int = 64,
    ) -> None:
        self._desc = describe_url(url)
        redis_url, self.prefix = _parse_url(url)
        try:
            # A bounded pool that makes callers wait for a connection (rather than opening
            # thousands under a heartbeat burst). No client retries: a script that timed out
            # may have run, and running it again would bump the revision twice. A connection
            # that a restarted server closed is noticed and reopened when it is checked out.
            pool = aioredis.BlockingConnectionPool.from_url(
                redis_url,
                max_connections=max_connections,
                timeout=op_timeout,
                socket_connect_timeout=connect_timeout,
                socket_timeout=op_timeout,
                decode_responses=True,
                retry=Retry(NoBackoff(), 0),
            )
        except ValueError as exc:
            raise StoreConfigError(f"{self._desc}: malformed Redis URL") from exc
        self._redis = aioredis.Redis(connection_pool=pool)
        self._scripts = {
            name: self._redis.register_script(_LUA_HEAD + body)
            for name, body in {
                "heartbeat": _HEARTBEAT,
                "delete_worker": _DELETE_WORKER,
                "delete_dead": _DELETE_DEAD,
                "create_instance": _CREATE_INSTANCE,
                "update_instance": _UPDATE_INSTANCE,
                "delete_instance": _DELETE_INSTANCE,
                "put_deployment": _PUT_DEPLOYMENT,
                "delete_deployment": _DELETE_DEPLOYMENT,
                "set_deployment_error": _SET_DEPLOYMENT_ERROR,
                "set_deployment_scale": _SET_DEPLOYMENT_SCALE,
                "put_load_report": _PUT_LOAD_REPORT,
                "list_load_reports": _LIST_LOAD_REPORTS,
                "acquire_lease": _ACQUIRE_LEASE,
                "release_lease": _RELEASE_LEASE,
                "get_lease": _GET_LEASE,
                "create_key": _CREATE_KEY,
                "revoke_key": _REVOKE_KEY,
                "record_outage": _RECORD_OUTAGE,
                "bump": "return redis.call('INCR', P .. ':rev')",
                "advance_revision": _ADVANCE_REVISION,
                "open_inference": _OPEN_INFERENCE,
                "record_accepted": _RECORD_ACCEPTED,
            }.items()
        }
        self._scripts["migrate"] = self._redis.register_script(_LUA_CORE + _MIGRATE)

    def _k(self, name: str) -> str:
        return f"{self.prefix}:{name}"

    async def _do(self, make: Callable[[], Awaitable[Any]], repeatable: bool) -> Any:
        """Run one command / script / MULTI block, translating errors.

        A pooled connection that a restarted server closed fails on its next use; then the
        other idle connections are just as dead, so they are all dropped, and a
        ``repeatable`` call (a read, or a write whose second run is still right if the first
        one landed: upserts, renewals, bumps) runs once more on a fresh connection."""
        for attempt in (0, 1):
            try:
                return await make()
            except Exception as exc:
                lost = isinstance(exc, rexc.ConnectionError) and not isinstance(exc, rexc.AuthenticationError)
                if lost:
                    await self._redis.connection_pool.disconnect(inuse_connections=False)
                    if repeatable and attempt == 0:
                        continue
                raise self._translate(exc) from exc
        raise AssertionError("unreachable")

    async def _script(self, name: str, *args: Any, repeatable: bool = False) -> Any:
        return await self._do(lambda: self._scripts[name](args=[self.prefix, *args]), repeatable)

    async def _call(self, make: Callable[[], Awaitable[Any]]) -> Any:
        """A single command that is safe to repeat (reads, SET of the schema key, INCR)."""
        return await self._do(make, True)

    async def _multi(self, build: Callable[[Any], None]) -> list[Any]:
        """Run the commands ``build`` queues in one MULTI/EXEC block: one round trip, one
        consistent view (TIME and the data it is compared with are read together)."""

        async def run() -> list[Any]:
            async with self._redis.pipeline(transaction=True) as pipe:
                build(pipe)
                return await pipe.execute()

        return await self._do(run, True)

    def _translate(self, exc: BaseException) -> StoreError:
        kind, reason = classify_error(exc)
        cls = StoreConfigError if kind == "config" else StoreUnavailable if kind == "unavailable" else StoreError
        return cls(f"{self._desc}: {reason}")

    # -- lifecycle -----------------------------------------------------------------
    async def migrate(self) -> None:
        # Nothing else to create up front (keys appear on first write). The version key
        # records which layout this prefix holds; the script converts layout 1 to 2.
        await self._script("migrate", uuid.uuid4().hex, SCHEMA_VERSION, repeatable=True)

    async def ping(self) -> None:
        version = await self._call(lambda: self._redis.get(self._k("schema")))
        if version != SCHEMA_VERSION:
            raise StoreUnavailable(f"{self._desc}: schema at {version!r}, expected {SCHEMA_VERSION!r}")

    async def persistence(self) -> Persistence:
        """Volatile when the server has neither RDB snapshots nor AOF: a restart loses everything."""
        try:
            save = await self._redis.config_get("save")
            aof = await self._redis.config_get("appendonly")
        except rexc.ResponseError as exc:  # managed Redis services often refuse CONFIG
            return Persistence("unknown", f"CONFIG GET refused ({str(exc).splitlines()[0][:100]})")
        except Exception as exc:
            raise self._translate(exc) from exc
        rdb, appendonly = save.get("save", ""), aof.get("appendonly", "no")
        if not rdb.strip() and appendonly != "yes":
            return Persistence("volatile", "the Redis server has neither RDB snapshots (save '') nor AOF "
                               "(appendonly no): a restart of it loses every deployment and API key")
        return Persistence("durable", f"save '{rdb}', appendonly {appendonly}")

    # -- identity, auth state, outages ---------------------------------------------------
    async def get_cluster_meta(self) -> ClusterMeta:
        meta = await self._call(lambda: self._redis.hgetall(self._k("meta")))
        if not meta.get("cluster_id"):
            return ClusterMeta(cluster_id=None)
        replaces = tuple(x for x in meta.get("replaces", "").split(",") if x)
        return ClusterMeta(cluster_id=meta["cluster_id"], auth=meta.get("auth", "none"), replaces=replaces)

    async def open_inference(self) -> None:
        await self._script("open_inference", repeatable=True)

    async def record_accepted(self, replaced_cluster_id: str, auth_required: bool) -> None:
        await self._script("record_accepted", replaced_cluster_id, "1" if auth_required else "0", repeatable=True)

    async def record_outage(self) -> float:
        return float(await self._script("record_outage"))

    async def now(self) -> float:
        sec, usec = await self._call(lambda: self._redis.time())
        return sec + usec / 1e6

    async def close(self) -> None:
        await self._redis.aclose()

    # -- workers -------------------------------------------------------------------
    async def heartbeat(self, worker: WorkerInfo, statuses: list[InstanceStatus] | None = None) -> HeartbeatResult:
        report = ""
        if statuses is not None:
            items = []
            for st in statuses:
                item: dict[str, Any] = {
                    "id": st.id,
                    "state": InstanceState(st.state).value,
                    "endpoint": st.endpoint,
                    "restarts": st.restarts,
                    "last_error": st.last_error,
                }
                if st.declared and st.model:
                    item["new"] = _instance_doc(
                        Instance(
                            id=st.id,
                            model=st.model,
                            worker_id=worker.id,
                            backend=st.backend or "",
                            source=st.source or "",
                            max_concurrency=st.max_concurrency or 4,
                        )
                    )
                items.append(item)
            report = orjson.dumps(items).decode()
        registered, rev = await self._script("heartbeat", worker.id, worker.model_dump_json(), report, repeatable=True)
        return HeartbeatResult(registered=registered == 1, revision=int(rev))

    @staticmethod
    def _worker(info: str, registered_at: str | None, hb: float, age: float) -> WorkerRecord:
        return WorkerRecord.model_validate(
            {
                **orjson.loads(info),
                "last_heartbeat": hb,
                "registered_at": float(registered_at or hb),
                "heartbeat_age": max(0.0, age),
            }
        )

    async def list_workers(self) -> list[WorkerRecord]:
        (sec, usec), infos, regs, hbs, lives, paused = await self._multi(
            lambda p: (
                p.time(),
                p.hgetall(self._k("workers")),
                p.hgetall(self._k("wreg")),
                p.zrange(self._k("whb"), 0, -1, withscores=True),
                p.zrange(self._k("wlive"), 0, -1, withscores=True),
                p.get(self._k("paused")),
            )
        )
        now = int(sec) + int(usec) / 1e6
        live_now = now - float(paused or 0)
        scores, live = dict(hbs), dict(lives)
        out = []
        for wid in sorted(infos):
            hb = float(scores.get(wid, now))
            age = live_now - float(live[wid]) if wid in live else now - hb
            out.append(self._worker(infos[wid], regs.get(wid), hb, age))
        return out

    async def get_worker(self, worker_id: str) -> WorkerRecord | None:
        (sec, usec), info, reg, hb, live, paused = await self._multi(
            lambda p: (
                p.time(),
                p.hget(self._k("workers"), worker_id),
                p.hget(self._k("wreg"), worker_id),
                p.zscore(self._k("whb"), worker_id),
                p.zscore(self._k("wlive"), worker_id),
                p.get(self._k("paused")),
            )
        )
        if info is None:
            return None
        now = int(sec) + int(usec) / 1e6
        hb = float(hb if hb is not None else now)
        age = now - float(paused or 0) - float(live) if live is not None else now - hb
        return self._worker(info, reg, hb, age)

    async def delete_worker(self, worker_id: str) -> bool:
        return await self._script("delete_worker", worker_id) == 1

    async def delete_dead_workers(self, older_than: float) -> list[str]:
        return list(await self._script("delete_dead", repr(float(older_than))))

    # -- instances -----------------------------------------------------------------
    async def create_instance(self, spec: InstanceSpec) -> Instance:
        doc = _instance_doc(Instance(**spec.model_dump()))
        raw = await self._script("create_instance", spec.id, orjson.dumps(doc).decode())
        if raw is None:
            raise StoreError(f"instance {spec.id} exists")
        return _instance(raw)

    async def get_instance(self, instance_id: str) -> Instance | None:
        raw = await self._call(lambda: self._redis.hget(self._k("inst"), instance_id))
        return _instance(raw) if raw else None

    async def list_instances(self, *, worker_id: str | None = None, model: str | None = None) -> list[Instance]:
        if worker_id is not None:
            ids = await self._call(lambda: self._redis.smembers(self._k(f"byworker:{worker_id}")))
            raws = await self._call(lambda: self._redis.hmget(self._k("inst"), list(ids))) if ids else []
        else:
            raws = list((await self._call(lambda: self._redis.hgetall(self._k("inst")))).values())
        out = [_instance(r) for r in raws if r]
        out = [
            i for i in out if (worker_id is None or i.worker_id == worker_id) and (model is None or i.model == model)
        ]
        return sorted(out, key=lambda i: i.id)

    async def update_instance(self, instance_id: str, **fields: object) -> Instance | None:
        allowed = SPEC_FIELDS | {"state", "last_error"}
        patch: dict[str, Any] = {}
        for k, v in fields.items():
            if k not in allowed:
                raise StoreError(f"field {k} cannot be updated")
            if k == "params":
                patch[k] = orjson.dumps(v).decode()
            elif k == "state":
                patch[k] = InstanceState(v).value  # type: ignore[arg-type]
            elif k == "enabled":
                patch[k] = bool(v)
            else:
                patch[k] = v
        raw = await self._script("update_instance", instance_id, orjson.dumps(patch).decode(), repeatable=True)
        return _instance(raw) if raw else None

    async def delete_instance(self, instance_id: str) -> bool:
        return await self._script("delete_instance", instance_id) == 1

    # -- deployments ---------------------------------------------------------------
    async def put_deployment(self, deployment: Deployment) -> Deployment:
        body = deployment.model_dump_json(exclude={"created_at", "updated_at", "error"})
        created, updated = await self._script("put_deployment", deployment.name, body, repeatable=True)
        return deployment.model_copy(update={"created_at": float(created), "updated_at": float(updated),
                                             "error": None})

    @staticmethod
    def _deployment(body: str, created: str | None, updated: str | None, error: str | None,
                    scale: str | None = None) -> Deployment:
        doc = orjson.loads(body)
        doc.update(created_at=float(created or 0), updated_at=float(updated or 0), error=error)
        if scale:
            doc.update(orjson.loads(scale))
        return Deployment.model_validate(doc)

    async def get_deployment(self, name: str) -> Deployment | None:
        body, created, updated, error, scale = await self._multi(
            lambda p: (p.hget(self._k("deps"), name), p.hget(self._k("depc"), name), p.hget(self._k("depu"), name),
                       p.hget(self._k("depe"), name), p.hget(self._k("depa"), name))
        )
        return self._deployment(body, created, updated, error, scale) if body else None

    async def list_deployments(self) -> list[Deployment]:
        bodies, created, updated, errors, scales = await self._multi(
            lambda p: (p.hgetall(self._k("deps")), p.hgetall(self._k("depc")), p.hgetall(self._k("depu")),
                       p.hgetall(self._k("depe")), p.hgetall(self._k("depa")))
        )
        return [self._deployment(bodies[n], created.get(n), updated.get(n), errors.get(n), scales.get(n))
                for n in sorted(bodies)]

    async def set_deployment_scale(self, name: str, replicas: int, status: AutoscaleStatus | None) -> bool:
        doc = {"replicas": int(replicas), "autoscale_status": status.model_dump() if status is not None else None}
        return await self._script("set_deployment_scale", name, orjson.dumps(doc).decode(), repeatable=True) == 1

    async def put_load_report(self, report: LoadReport, ttl: float) -> None:
        body = report.model_dump_json(exclude={"expires_in"})
        await self._script("put_load_report", report.source, body, repr(float(ttl)), repeatable=True)

    async def list_load_reports(self) -> list[LoadReport]:
        flat = await self._script("list_load_reports", repeatable=True)
        out = []
        for i in range(0, len(flat), 2):
            doc = orjson.loads(flat[i])
            doc["expires_in"] = float(flat[i + 1])
            out.append(LoadReport.model_validate(doc))
        return out

    async def delete_deployment(self, name: str) -> bool:
        return await self._script("delete_deployment", name) == 1

    async def set_deployment_error(self, name: str, error: str | None) -> bool:
        return await self._script("set_deployment_error", name, error or "", repeatable=True) == 1

    # -- leases --------------------------------------------------------------------
    async def acquire_lease(self, name: str, holder: str, ttl: float) -> Lease | None:
        token = await self._script("acquire_lease", name, holder, repr(float(ttl)), repeatable=True)
        if token is None:
            return None
        # Taken or renewed: expires at server-now + ttl, set by this very script.
        return Lease(name=name, holder=holder, token=int(token), expires_in=float(ttl))

    async def release_lease(self, name: str, holder: str) -> None:
        await self._script("release_lease", name, holder, repeatable=True)

    async def get_lease(self, name: str) -> Lease | None:
        got = await self._script("get_lease", name, repeatable=True)
        if not got:
            return None
        holder, token, left = got
        return Lease(name=name, holder=holder, token=int(token), expires_in=float(left))

    # -- routing revision ----------------------------------------------------------
    async def get_revision(self) -> int:
        return int(await self._call(lambda: self._redis.get(self._k("rev"))) or 0)

    async def bump_revision(self) -> int:
        return int(await self._script("bump", repeatable=True))

    async def advance_revision(self, at_least: int) -> int:
        return int(await self._script("advance_revision", str(int(at_least)), repeatable=True))

    # -- api keys ------------------------------------------------------------------
    async def create_api_key(self, key: ApiKey) -> ApiKey:
        body = orjson.dumps({"id": key.id, "name": key.name, "secret_hash": key.secret_hash}).decode()
        created = await self._script("create_key", key.id, body, "1" if key.revoked else "0")
        if created is None:
            raise StoreError(f"api key {key.id} exists")
        return key.model_copy(update={"created_at": float(created)})

    async def list_api_keys(self) -> list[ApiKey]:
        bodies, created, revoked = await self._multi(
            lambda p: (p.hgetall(self._k("keys")), p.hgetall(self._k("keyc")), p.smembers(self._k("keyrev")))
        )
        return [
            ApiKey(**orjson.loads(bodies[i]), created_at=float(created.get(i, 0)), revoked=i in revoked)
            for i in sorted(bodies)
        ]

    async def revoke_api_key(self, key_id: str) -> bool:
        return await self._script("revoke_key", key_id, repeatable=True) == 1


# -- error classification ------------------------------------------------------------
def _caused_by_dns(exc: BaseException) -> bool:
    seen: BaseException | None = exc
    for _ in range(8):
        if seen is None:
            return False
        if isinstance(seen, socket.gaierror):
            return True
        seen = seen.__cause__ or seen.__context__
    return False


def classify_error(exc: BaseException) -> tuple[str, str]:
    """("config" | "unavailable" | "error", short reason); the reason never quotes the URL."""
    msg = str(exc).lower()
    if isinstance(exc, rexc.AuthenticationError | rexc.AuthenticationWrongNumberOfArgsError) or (
        isinstance(exc, rexc.ResponseError) and ("noauth" in msg or "wrongpass" in msg)
    ):
        return "config", "authentication failed"
    if isinstance(exc, rexc.ResponseError) and "db index" in msg:
        return "config", "unknown database number"
    if isinstance(exc, rexc.ResponseError) and NO_SCHEMA.lower() in msg:
        return "unavailable", "no modelfleet schema under this prefix (the store lost its state?)"
    if _caused_by_dns(exc) or "name or service not known" in msg or "name resolution" in msg:
        return "config", "unknown host"
    if isinstance(exc, rexc.TimeoutError | TimeoutError):
        return "unavailable", "timed out"
    if isinstance(exc, rexc.BusyLoadingError):
        return "unavailable", "server is loading its dataset"
    if isinstance(exc, rexc.ConnectionError | ConnectionError | OSError):
        if "refused" in msg or "error 111 " in msg or "connect call failed" in msg:
            return "unavailable", "connection refused"
        return "unavailable", "connection to the server lost"
    if isinstance(exc, rexc.ReadOnlyError):
        return "unavailable", "server is a read-only replica"
    return "error", f"{type(exc).__name__}: {str(exc).splitlines()[0][:200] if str(exc) else ''}"


__all__ = ["RedisStore", "classify_error"]
