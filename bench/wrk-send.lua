-- wrk script: POST an Adaptive Card activity with the bearer token in $TOKEN.
wrk.method = "POST"
wrk.headers["Content-Type"] = "application/json"
wrk.headers["Authorization"] = "Bearer " .. os.getenv("TOKEN")
wrk.body = '{"type":"message","summary":"Disk full","attachments":[{"contentType":"application/vnd.microsoft.card.adaptive","content":{"type":"AdaptiveCard","version":"1.4","body":[{"type":"TextBlock","text":"Disk full","weight":"Bolder"},{"type":"TextBlock","text":"/var at 99% on db-1","wrap":true}]}}]}'
