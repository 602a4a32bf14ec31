-- Scenario "me": the same authenticated query on every request.
-- Arguments (after --): <JSON body> <access token>
dofile((debug.getinfo(1, "S").source:match("^@(.*/)") or "./") .. "common.lua")

wrk.method = "POST"
wrk.headers["Content-Type"] = "application/json"

function init(args)
   wrk.body = args[1]
   wrk.headers["Authorization"] = "Bearer " .. args[2]
end

function response(status, headers, body)
   -- A user object (not null) and no GraphQL error.
   if status == 200 and body:find('"me"%s*:%s*{') and not body:find('"errors"', 1, true) then
      record("ok")
   else
      record(failure_of(status, body), body)
   end
end
