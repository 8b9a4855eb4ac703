"""foundry-echo — an unmodified Foundry hosted agent, as written for Azure AI Foundry.

It uses `azure-ai-agentserver-responses` exactly as that package's README shows: a
`ResponsesAgentServerHost` (a Starlette app served by Hypercorn on asyncio) with one async handler.
The host serves POST /responses (JSON and SSE), GET/DELETE /responses/{id}, /cancel,
/input_items and GET /readiness on 0.0.0.0:$PORT (default 8088). Nothing here knows about Hangar.
"""

import asyncio

from azure.ai.agentserver.responses import (
    CreateResponse,
    ResponseContext,
    ResponsesAgentServerHost,
    TextResponse,
)

app = ResponsesAgentServerHost()


@app.response_handler
async def handler(request: CreateResponse, context: ResponseContext, cancellation_signal: asyncio.Event):
    text = await context.get_input_text()
    return TextResponse(context, request, text=f"echo: {text}")


if __name__ == "__main__":
    app.run()
