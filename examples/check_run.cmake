# Runs COMMAND (arguments separated by '|') and fails unless it exits with EXIT and its output
# (stdout and stderr together) matches the regular expression MATCH. Used by the examples' tests
# of bad input, which must print a message, not crash.
string(REPLACE "|" ";" command "${COMMAND}")
execute_process(COMMAND ${command} RESULT_VARIABLE rc OUTPUT_VARIABLE out ERROR_VARIABLE out)
message("${out}")
if(NOT rc STREQUAL "${EXIT}")
  message(FATAL_ERROR "exit status ${rc}, expected ${EXIT}: ${command}")
endif()
if(NOT out MATCHES "${MATCH}")
  message(FATAL_ERROR "output does not match \"${MATCH}\": ${command}")
endif()
