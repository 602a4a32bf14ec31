-- Shared by the scenario scripts, which load it with dofile. wrk runs every script once
-- in its main Lua state (setup, done) and once per thread (init, request, response).
--
-- Each thread counts the outcome of every response in its own `outcomes` table and keeps
-- the first unexpected body in `sample`; done() adds the threads up and prints one line,
-- "BENCH_RESULT {json}", which bench/run.py parses. Latencies are in microseconds.

local threads = {}

outcomes = {} -- per thread: outcome -> count ("ok", an AuthErrorCode, "http_500", ...)
sample = nil -- per thread: the first response body that was not "ok"

function setup(thread)
   thread:set("thread_index", #threads)
   table.insert(threads, thread)
end

-- Count one response as `outcome`: "ok", or what failure_of() makes of a failed one.
function record(outcome, body)
   outcomes[outcome] = (outcomes[outcome] or 0) + 1
   if outcome ~= "ok" and sample == nil and body ~= nil then
      sample = string.sub(body, 1, 500)
   end
end

-- The AuthErrorCode or GraphQL extensions.code of a failed answer, else its HTTP status.
function failure_of(status, body)
   local code = string.match(body or "", '"code"%s*:%s*"([%w_]+)"')
   if code ~= nil then
      return code
   end
   return "http_" .. status
end

local function json_string(s)
   local escaped = string.gsub(s, '[%c"\\]', function(c)
      return string.format("\\u%04x", string.byte(c))
   end)
   return '"' .. escaped .. '"'
end

function done(summary, latency, requests)
   local totals, samples = {}, {}
   for _, thread in ipairs(threads) do
      for outcome, n in pairs(thread:get("outcomes")) do
         totals[outcome] = (totals[outcome] or 0) + n
      end
      local s = thread:get("sample")
      if s ~= nil then
         table.insert(samples, json_string(s))
      end
   end
   local counted = {}
   for outcome, n in pairs(totals) do
      table.insert(counted, json_string(outcome) .. ":" .. string.format("%d", n))
   end
   local e = summary.errors
   io.write(string.format(
      'BENCH_RESULT {"requests":%.0f,"duration_us":%.0f,"bytes":%.0f,'
         .. '"p50_us":%.1f,"p99_us":%.1f,"mean_us":%.1f,"max_us":%.1f,'
         .. '"errors":{"connect":%.0f,"read":%.0f,"write":%.0f,"status":%.0f,"timeout":%.0f},'
         .. '"outcomes":{%s},"samples":[%s]}\n',
      summary.requests, summary.duration, summary.bytes,
      latency:percentile(50), latency:percentile(99), latency.mean, latency.max,
      e.connect, e.read, e.write, e.status, e.timeout,
      table.concat(counted, ","), table.concat(samples, ",")
   ))
end
