"""The Redis store's Lua scripts: each write, and each read that must see one
revision, is one script, so it is atomic and costs one round trip.

Keys (all under one hash tag, the namespace, so they share a Cluster slot):
  meta      HASH  rev (the store-wide revision counter), epoch, secret, compacted
  rec       HASH  id -> packed operation (store.packing.pack_record), live or
                  the last state of a deleted one (its tombstone)
  rev       HASH  id -> revision of that state
  made      HASH  id -> created revision
  idx       HASH  id -> "1"/"0" (terminal) .. count key, for live operations only
  changes   ZSET  id -> latest revision (write or delete): "what changed after N"
  tombs     ZSET  id -> revision of its delete, oldest trimmed past the history size
  created   ZSET  id -> created revision, live operations (creation order, paging)
  children:<parent>  ZSET child id -> created revision
  leases    ZSET  id -> lease deadline (last report + heartbeat timeout)
  finished  ZSET  id -> finish time (retention)
  counts    HASH  "STATE\\0kind" -> operations held
  finishes  STREAM  packed record of each operation as it first finished (statistics)
  logs:<id>, timeline:<id>  LIST  packed entries; logsn / timelinen HASH id -> appended
Writes are announced on the namespace's channel ("<rev> <epoch>", with " f"
added when a write finished an operation): by the WRITE script itself when the
process asks it to (at most once per ANNOUNCE_DELAY, store/redis.py), else by a
PUBLISH of the process soon after; every process's tailer follows the channel
(and polls, in case a notification was lost).
"""

from __future__ import annotations

# Error codes the scripts return as {code}; positive values are revisions.
NOT_FOUND = -1
CONFLICT = -2
EXISTS = -3
FULL = -4
# The keyspace has no epoch: it is new, or was flushed; the caller initializes it.
NO_EPOCH = -5
# The epoch differs from the caller's (changes(), and the scripts that write).
# changes(): the revision is outside what the store holds.
OTHER_EPOCH = -6
OUT_OF_RANGE = -7
# A replace of an operation deleted since (its tombstone is held): the
# producer must not register it again (domain.errors.Deleted).
DELETED = -8

# KEYS: meta. ARGV: epoch, secret (used only if the keyspace has none).
INIT = """
redis.call('HSETNX', KEYS[1], 'epoch', ARGV[1])
redis.call('HSETNX', KEYS[1], 'secret', ARGV[2])
return redis.call('HMGET', KEYS[1], 'epoch', 'secret', 'rev')
"""

# Creates or replaces operations, in order, each on its own (one failing does
# not stop the rest).
# KEYS: 1 meta, 2 rec, 3 rev, 4 made, 5 idx, 6 changes, 7 created, 8 leases,
#       9 finished, 10 counts, 11 tombs, 12 finishes, 13 active (HASH project ->
#       active operations), then per write its parent's children ZSET (or any
#       key, unused, when it has no parent)
# ARGV: 1 the caller's epoch, 2 max operations, 3 max finishes kept, 4 the
#       notification channel, 5 announce: 0 no, 1 yes, 2 yes and as a finish
#       (whether or not one of these writes finished an operation), then per write:
#       mode (c: create, r: replace), id, expected revision ('^': whatever the
#       previous write of this id in this call stored), record, terminal (1/0),
#       count key, lease deadline or '' (none) or '-' (none, and none before),
#       finish time or '', has parent (1/0), project
# Returns per write {revision, created revision (0 for a replace: it keeps
# the one it had), finishes entry id or ''}, or
# {error, 0, ''}, then the revision announced (0: none); or {NO_EPOCH} or
# {OTHER_EPOCH} alone. Announcing PUBLISHes the store's revision on the
# channel (as the store's notifications are), after the writes, ' f' added
# if one of them finished an operation or ARGV[5] is 2.
WRITE = """
local meta = KEYS[1]
local epoch = redis.call('HGET', meta, 'epoch')
if not epoch then return {-5} end
if epoch ~= ARGV[1] then return {-6} end
local out, wrote = {}, {}
local finished = ARGV[5] == '2'
local n = (#ARGV - 5) / 10
for w = 0, n - 1 do
  local a = 5 + 10 * w
  local mode, id, expected, record = ARGV[a + 1], ARGV[a + 2], ARGV[a + 3], ARGV[a + 4]
  local term, key, lease, finish = ARGV[a + 5], ARGV[a + 6], ARGV[a + 7], ARGV[a + 8]
  local old = redis.call('HGET', KEYS[5], id)
  local err = nil
  if mode == 'c' then
    if old then err = -3
    elseif redis.call('ZCARD', KEYS[7]) >= tonumber(ARGV[2]) then err = -4 end
  elseif not old then err = redis.call('ZSCORE', KEYS[11], id) and -8 or -1
  else
    if expected == '^' then expected = wrote[id] or '' end
    if redis.call('HGET', KEYS[3], id) ~= expected then err = -2 end
  end
  if err then
    out[#out + 1] = err; out[#out + 1] = 0; out[#out + 1] = ''
  else
    local rev = redis.call('HINCRBY', meta, 'rev', 1)
    local created
    if mode == 'c' then
      created = rev
      redis.call('HSET', KEYS[4], id, rev)
      redis.call('ZADD', KEYS[7], rev, id)
      -- an id deleted earlier and created again is live, not a tombstone
      redis.call('ZREM', KEYS[11], id)
      if ARGV[a + 9] == '1' then redis.call('ZADD', KEYS[13 + w + 1], rev, id) end
    else
      created = 0  -- unchanged: the caller has it
    end
    -- active (not terminal) operations by project
    local was_active = (old and string.sub(old, 1, 1) == '0') == true
    if was_active ~= (term == '0') then
      redis.call('HINCRBY', KEYS[13], ARGV[a + 10], term == '0' and 1 or -1)
    end
    -- most reports change neither state nor kind: their counts stay
    if old ~= term .. key then
      if old then
        local oldkey = string.sub(old, 2)
        if redis.call('HINCRBY', KEYS[10], oldkey, -1) <= 0 then
          redis.call('HDEL', KEYS[10], oldkey)
        end
      end
      redis.call('HINCRBY', KEYS[10], key, 1)
      redis.call('HSET', KEYS[5], id, term .. key)
    end
    redis.call('HSET', KEYS[2], id, record)
    redis.call('HSET', KEYS[3], id, rev)
    redis.call('ZADD', KEYS[6], rev, id)
    if lease == '' then
      redis.call('ZREM', KEYS[8], id)
    elseif lease ~= '-' then
      redis.call('ZADD', KEYS[8], lease, id)
    end
    if finish ~= '' then
      -- the first finish time stays (retention counts from it)
      redis.call('ZADD', KEYS[9], 'NX', finish, id)
    elseif old and string.sub(old, 1, 1) == '1' then
      redis.call('ZREM', KEYS[9], id)
    end
    local entry = ''
    if term == '1' and (not old or string.sub(old, 1, 1) ~= '1') then
      entry = redis.call('XADD', KEYS[12], 'MAXLEN', '~', ARGV[3], '*', 'r', record)
      finished = true
    end
    wrote[id] = tostring(rev)
    out[#out + 1] = rev; out[#out + 1] = created; out[#out + 1] = entry
  end
end
local announced = 0
if ARGV[5] ~= '0' then
  local rev = redis.call('HGET', meta, 'rev') or '0'
  redis.call('PUBLISH', ARGV[4], rev .. ' ' .. epoch .. (finished and ' f' or ''))
  announced = tonumber(rev)
end
out[#out + 1] = announced
return out
"""

# KEYS: meta rec rev made idx changes created children leases finished counts
#       tombs logs timeline logn timelinen active
# ARGV: 1 id, 2 history size (tombstones kept), 3 the caller's epoch, 4 its project
# Returns {revision} or {error}.
DELETE = """
local meta, id = KEYS[1], ARGV[1]
local epoch = redis.call('HGET', meta, 'epoch')
if not epoch then return {-5} end
if epoch ~= ARGV[3] then return {-6} end
local old = redis.call('HGET', KEYS[5], id)
if not old then return {-1} end
local rev = redis.call('HINCRBY', meta, 'rev', 1)
if string.sub(old, 1, 1) == '0' then redis.call('HINCRBY', KEYS[17], ARGV[4], -1) end
local key = string.sub(old, 2)
if redis.call('HINCRBY', KEYS[11], key, -1) <= 0 then redis.call('HDEL', KEYS[11], key) end
redis.call('HDEL', KEYS[5], id)
redis.call('ZREM', KEYS[7], id)
redis.call('ZREM', KEYS[8], id)
redis.call('ZREM', KEYS[9], id)
redis.call('ZREM', KEYS[10], id)
redis.call('ZADD', KEYS[6], rev, id)
redis.call('ZADD', KEYS[12], rev, id)
redis.call('DEL', KEYS[13], KEYS[14])
redis.call('HDEL', KEYS[15], id)
redis.call('HDEL', KEYS[16], id)
local limit = tonumber(ARGV[2])
while redis.call('ZCARD', KEYS[12]) > limit do
  local dropped = redis.call('ZPOPMIN', KEYS[12])
  local tid, trev = dropped[1], tonumber(dropped[2])
  redis.call('ZREM', KEYS[6], tid)
  redis.call('HDEL', KEYS[2], tid)
  redis.call('HDEL', KEYS[3], tid)
  redis.call('HDEL', KEYS[4], tid)
  local compacted = tonumber(redis.call('HGET', meta, 'compacted') or '0')
  if trev > compacted then redis.call('HSET', meta, 'compacted', trev) end
end
return {rev}
"""

# KEYS: meta changes rec rev made idx
# ARGV: 1 after, 2 limit, 3 live only (1/0), 4 the caller's epoch
# Returns {store revision, compacted, n, then per change: id, revision, record,
# state revision, created revision, live (1/0)} or {error, ...}.
CHANGES = """
local meta = KEYS[1]
local head = redis.call('HMGET', meta, 'epoch', 'rev', 'compacted')
if head[1] ~= ARGV[4] then return {-6, head[1] or ''} end
local rev = tonumber(head[2] or '0')
local compacted = tonumber(head[3] or '0')
local after = tonumber(ARGV[1])
-- a snapshot (live only) reads everything held, whatever was compacted
if ARGV[3] ~= '1' and (after > rev or after < compacted) then return {-7, rev, compacted} end
local found = redis.call('ZRANGEBYSCORE', KEYS[2], '(' .. ARGV[1], '+inf', 'WITHSCORES',
  'LIMIT', 0, tonumber(ARGV[2]))
local out = {rev, compacted, 0}
local n = 0
for i = 1, #found, 2 do
  local id = found[i]
  local live = redis.call('HEXISTS', KEYS[6], id)
  if live == 1 or ARGV[3] ~= '1' then
    out[#out + 1] = id
    out[#out + 1] = found[i + 1]
    out[#out + 1] = redis.call('HGET', KEYS[3], id)
    out[#out + 1] = redis.call('HGET', KEYS[4], id)
    out[#out + 1] = redis.call('HGET', KEYS[5], id)
    out[#out + 1] = live
    n = n + 1
  end
end
out[3] = n
return out
"""

# KEYS: rec rev made idx. ARGV: ids.
# Returns per id: record, revision, created revision (false when not live).
GET = """
local out = {}
for i = 1, #ARGV do
  local id = ARGV[i]
  if redis.call('HEXISTS', KEYS[4], id) == 1 then
    out[#out + 1] = redis.call('HGET', KEYS[1], id)
    out[#out + 1] = redis.call('HGET', KEYS[2], id)
    out[#out + 1] = redis.call('HGET', KEYS[3], id)
  else
    out[#out + 1] = false
    out[#out + 1] = false
    out[#out + 1] = false
  end
end
return out
"""

# KEYS: rec rev made tombs. ARGV: id.
# Returns {delete revision, record, state revision, created revision} or {}.
TOMBSTONE = """
local deleted = redis.call('ZSCORE', KEYS[4], ARGV[1])
if not deleted then return {} end
return {deleted, redis.call('HGET', KEYS[1], ARGV[1]), redis.call('HGET', KEYS[2], ARGV[1]),
  redis.call('HGET', KEYS[3], ARGV[1])}
"""

# KEYS: meta, an index ZSET, rev. ARGV: 1 min score (exclusive), 2 limit (-1: all).
# Returns {store revision, then id, score, revision per member in score order}.
MEMBERS = """
local out = {tonumber(redis.call('HGET', KEYS[1], 'rev') or '0')}
local found = redis.call('ZRANGEBYSCORE', KEYS[2], '(' .. ARGV[1], '+inf', 'WITHSCORES',
  'LIMIT', 0, tonumber(ARGV[2]))
for i = 1, #found, 2 do
  out[#out + 1] = found[i]
  out[#out + 1] = found[i + 1]
  out[#out + 1] = redis.call('HGET', KEYS[3], found[i])
end
return out
"""

# KEYS: entries list, appended-count HASH. ARGV: 1 id, 2 max kept, 3.. entries.
# Returns {appended so far, held}.
APPEND = """
local n = #ARGV - 2
for i = 3, #ARGV do redis.call('RPUSH', KEYS[1], ARGV[i]) end
local appended = redis.call('HINCRBY', KEYS[2], ARGV[1], n)
redis.call('LTRIM', KEYS[1], -tonumber(ARGV[2]), -1)
return {appended, redis.call('LLEN', KEYS[1])}
"""

# KEYS: entries list, appended-count HASH. ARGV: id.
# Returns {appended so far, entries...}.
ENTRIES = """
local out = {tonumber(redis.call('HGET', KEYS[2], ARGV[1]) or '0')}
for _, e in ipairs(redis.call('LRANGE', KEYS[1], 0, -1)) do out[#out + 1] = e end
return out
"""
