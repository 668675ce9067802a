defmodule LMPort.Error do
  @moduledoc """
  Every failure the client reports: the worker's error codes (`"invalid_params"`, `"cancelled"`,
  `"deadline_exceeded"`, `"overloaded"`, ...) and the client's own:

    * `"deadline_exceeded"` with `details["client_side"] == true` — the client-side deadline (request
      timeout plus grace) passed without a response; the request was cancelled in the worker.
    * `"worker_exited"` — the worker process exited (or was killed) while the request was pending.
    * `"spawn_failed"` — the worker could not be started (no Python, no hello) or is not running.
    * `"protocol_mismatch"` — the worker's `hello` announced another protocol major version.
    * `"protocol_error"` — a frame from the worker could not be decoded (the worker is then killed), or a
      stream's chunk `seq` skipped (the stream is cancelled).

  A request that cannot be encoded is `"invalid_params"` (`details["field"] == "params"`).

  `details` holds the worker's `details` map (for `"invalid_params"`, `details["field"]` names the field).
  """
  defexception [:code, :message, retryable: false, details: %{}, python_type: nil, traceback: nil]

  @type t :: %__MODULE__{
          code: String.t(),
          message: String.t(),
          retryable: boolean,
          details: map,
          python_type: String.t() | nil,
          traceback: String.t() | nil
        }

  @impl true
  def message(%__MODULE__{code: code, message: msg}), do: "[#{code}] #{msg}"

  @doc "Builds an error from a response's `error` map."
  @spec from_wire(map) :: t
  def from_wire(%{} = e) do
    %__MODULE__{
      code: Map.get(e, "code", "internal"),
      message: Map.get(e, "message", ""),
      retryable: Map.get(e, "retryable", false),
      details: Map.get(e, "details") || %{},
      python_type: Map.get(e, "python_type"),
      traceback: Map.get(e, "traceback")
    }
  end

  @doc false
  @spec new(String.t(), String.t(), map) :: t
  def new(code, message, details \\ %{}), do: %__MODULE__{code: code, message: message, details: details}
end
