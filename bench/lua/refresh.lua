-- Scenario "refresh": refresh-token rotation over many sessions.
-- Arguments (after --): <JSON body template, "@TOKEN@" marks the token> <token file> <threads>
--
-- Every refresh spends its token and answers with the next one of the same session. Each
-- wrk thread takes every <threads>-th token of the file into a pool; request() takes the
-- oldest token out of the pool and response() puts the successor parsed from the answer
-- back. A token is thus in at most one request at a time, and always the newest of its
-- session. The file needs a token per connection; spare ones keep a chain lost to a failed
-- answer from leaving a connection without a token ("no_token_left").
dofile((debug.getinfo(1, "S").source:match("^@(.*/)") or "./") .. "common.lua")

wrk.method = "POST"
wrk.headers["Content-Type"] = "application/json"

local pool = {}
local prefix, suffix = "", ""

function init(args)
   local template, path, stride = args[1], args[2], tonumber(args[3])
   local at = template:find("@TOKEN@", 1, true)
   prefix, suffix = template:sub(1, at - 1), template:sub(at + #"@TOKEN@")
   local n = 0
   for line in io.lines(path) do
      if line ~= "" then
         if n % stride == thread_index then
            table.insert(pool, line)
         end
         n = n + 1
      end
   end
end

-- wrk calls request() once in thread 0's state before the run, only to check that the
-- script makes a well-formed request; that request is never sent and must spend no token.
local probed = false

function request()
   if thread_index == 0 and not probed then
      probed = true
      return wrk.format(nil, nil, nil, prefix .. "probe" .. suffix)
   end
   local token = table.remove(pool, 1)
   if token == nil then
      -- Chains were lost to failed answers; this request fails too and is counted twice.
      record("no_token_left")
      token = "no-token-left"
   end
   return wrk.format(nil, nil, nil, prefix .. token .. suffix)
end

function response(status, headers, body)
   local successor = body:match('"refreshToken"%s*:%s*"([%w_%-]+)"')
   if status == 200 and successor ~= nil and body:find('"AuthSession"', 1, true) then
      table.insert(pool, successor)
      record("ok")
   else
      record(failure_of(status, body), body)
   end
end
