-- Scenario "login", clients that ignore retryAfter (reported only, not a target; the
-- measured login load is bench/login_client.py): the same email and password on every
-- request, each connection straight back after each answer. Only an AuthSession answer
-- counts as "ok"; RATE_LIMITED (the password-hash queue is full) is counted apart.
-- Arguments (after --): <JSON body>
dofile((debug.getinfo(1, "S").source:match("^@(.*/)") or "./") .. "common.lua")

wrk.method = "POST"
wrk.headers["Content-Type"] = "application/json"

function init(args)
   wrk.body = args[1]
end

function response(status, headers, body)
   if status == 200 and body:find('"AuthSession"', 1, true) then
      record("ok")
   else
      record(failure_of(status, body), body)
   end
end
